"""GRPO math against direct computations written out token by token and sequence by sequence."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rl.algorithms import (
    group_advantages,
    grpo_loss,
    kl_k3,
    kl_penalized_rewards,
    overlong_penalty,
    zero_variance_groups,
)

# ---------------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_normalise_by_group_mean_and_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 3.0, 0.5])
    adv = group_advantages(rewards, 4, eps=1e-6)
    for g in range(2):
        r = rewards[g * 4:(g + 1) * 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # Bessel's correction
        for i in range(4):
            assert adv[g * 4 + i].item() == pytest.approx((r[i] - mean) / (std + 1e-6), rel=1e-5)


def test_dr_grpo_advantages_are_mean_centred_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 7.0])
    adv = group_advantages(rewards, 3, scale="none")
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])


def test_zero_variance_groups_get_zero_advantage_and_are_flagged():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True]
    for scale in ("std", "none"):
        adv = group_advantages(rewards, 3, scale=scale)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[6:].tolist() == [0.0, 0.0, 0.0]
        assert torch.isfinite(adv).all()


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), 3, scale="max")


# ---------------------------------------------------------------------------------------------------------
# KL, penalties


def test_kl_k3_matches_formula_and_is_nonnegative():
    logp = torch.randn(50)
    ref = torch.randn(50)
    out = kl_k3(logp, ref)
    for a, b, k in zip(logp.tolist(), ref.tolist(), out.tolist()):
        assert k == pytest.approx(math.exp(b - a) - (b - a) - 1, rel=1e-5, abs=1e-6)
        assert k >= 0
    assert kl_k3(logp, logp).abs().max() == 0


def test_overlong_penalty_follows_dapo():
    lengths = torch.tensor([0, 10, 12, 13, 16, 20, 25])
    max_new, buffer = 20, 8  # soft zone: 12 < len <= 20
    out = overlong_penalty(lengths, max_new, buffer, penalty=0.5)
    for length, value in zip(lengths.tolist(), out.tolist()):
        if length <= 12:
            expected = 0.0
        elif length <= 20:
            expected = (12 - length) / 8
        else:
            expected = -1.0
        assert value == pytest.approx(0.5 * expected)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 20, 0, 1.0)


def test_kl_penalized_rewards_subtract_the_sequence_kl():
    torch.manual_seed(0)
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    for estimator in ("k1", "k3"):
        out = kl_penalized_rewards(rewards, logp, ref, mask, 0.1, estimator=estimator)
        for i in range(3):
            total = 0.0
            for t in range(5):
                if mask[i, t]:
                    a, b = logp[i, t].item(), ref[i, t].item()
                    total += (a - b) if estimator == "k1" else math.exp(b - a) - (b - a) - 1
            assert out[i].item() == pytest.approx(rewards[i].item() - 0.1 * total, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the loss, against a direct per-token formula


def _direct_token_loss(logp, old, adv, ref, engine, *, clip_low, clip_high, kl_coef, tis_cap):
    """One token's loss, written out with scalars of the same tensors (differentiable through `logp`)."""
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    if float(ratio.detach()) < 1 - clip_low:
        clipped = -adv * (1 - clip_low)
    elif float(ratio.detach()) > 1 + clip_high:
        clipped = -adv * (1 + clip_high)
    else:
        clipped = -adv * ratio
    loss = unclipped if float(unclipped.detach()) >= float(torch.as_tensor(clipped).detach()) else clipped
    if engine is not None:
        loss = loss * min(math.exp(old - engine), tis_cap)
    if ref is not None and kl_coef:
        loss = loss + kl_coef * (torch.exp(ref - logp) - (ref - logp) - 1)
    return loss


def _direct_loss(logp, old, adv, mask, *, ref=None, engine=None, clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                 tis_cap=None, agg="token_mean", seq_ids=None):
    """(loss_sum, n_units) with plain loops: tokens for token_mean, sequences (row, id) for sequence_mean."""
    b, s = logp.shape
    per_seq: dict[tuple[int, int], list] = {}
    total = logp.new_zeros(())
    n_tokens = 0
    for i in range(b):
        for t in range(s):
            if not mask[i, t]:
                continue
            seq = 0 if seq_ids is None else int(seq_ids[i, t])
            if seq < 0:
                continue
            a = adv[i, t] if adv.dim() == 2 else adv[i]
            loss = _direct_token_loss(
                logp[i, t], old[i, t].item(), a.item(),
                None if ref is None else ref[i, t].item(), None if engine is None else engine[i, t].item(),
                clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, tis_cap=tis_cap,
            )
            total = total + loss
            n_tokens += 1
            per_seq.setdefault((i, seq), []).append(loss)
    if agg == "token_mean":
        return total, n_tokens
    seq_total = logp.new_zeros(())
    for losses in per_seq.values():
        seq_total = seq_total + sum(losses) / len(losses)
    return seq_total, len(per_seq)


def _batch(b=3, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g) * 3
    # ratios spread on both sides of both clip bounds
    logp = (old + (torch.rand(b, s, generator=g) - 0.5) * 1.2).requires_grad_(True)
    adv = torch.randn(b, s, generator=g)
    mask = torch.rand(b, s, generator=g) > 0.25
    ref = old + torch.randn(b, s, generator=g) * 0.3
    engine = old + torch.randn(b, s, generator=g) * 0.5
    return logp, old, adv, mask, ref, engine


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clip_low": 0.1, "clip_high": 0.4},
        {"kl_coef": 0.05},
        {"kl_coef": 0.05, "tis_cap": 1.5},
        {"tis_cap": 2.0},
        {"agg": "sequence_mean"},
        {"agg": "sequence_mean", "kl_coef": 0.1, "tis_cap": 1.2},
    ],
    ids=["plain", "asymmetric_clip", "kl", "kl_tis", "tis", "seq_mean", "seq_mean_kl_tis"],
)
def test_grpo_loss_and_gradient_match_direct_formula(options):
    logp, old, adv, mask, ref, engine = _batch()
    kl_coef = options.get("kl_coef", 0.0)
    tis_cap = options.get("tis_cap")
    kwargs = {"clip_low": options.get("clip_low", 0.2), "clip_high": options.get("clip_high", 0.28),
              "agg": options.get("agg", "token_mean")}
    loss, n, stats = grpo_loss(
        logp, old, adv, mask, ref_logp=ref if kl_coef else None, kl_coef=kl_coef,
        engine_logp=engine if tis_cap else None, tis_cap=tis_cap, **kwargs,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    expected, expected_n = _direct_loss(
        logp, old, adv, mask, ref=ref if kl_coef else None, engine=engine if tis_cap else None,
        kl_coef=kl_coef, tis_cap=tis_cap, **kwargs,
    )
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert int(n) == expected_n
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert stats["tokens"].item() == mask.sum().item()


def test_grpo_loss_accepts_one_advantage_per_row():
    logp, old, adv, mask, _, _ = _batch()
    per_row = adv[:, 0]
    loss, n, _ = grpo_loss(logp, old, per_row, mask)
    expected, expected_n = _direct_loss(logp, old, per_row, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(n) == expected_n


def test_sequence_mean_with_packed_rows_and_padding():
    logp, old, adv, _, _, _ = _batch(b=2, s=10, seed=3)
    # row 0: sequences 0 (3 tokens), 1 (5 tokens), padding; row 1: sequences 0 (6 tokens), 1 (4 tokens)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    # prompt tokens (mask false) at the start of each sequence
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    mask_with_pad = mask.clone()
    mask_with_pad[0, 8] = True  # a masked padding position is not a sequence and does not count
    loss, n, _ = grpo_loss(logp, old, adv, mask_with_pad, agg="sequence_mean", sequence_ids=seq_ids)
    expected, expected_n = _direct_loss(logp, old, adv, mask, agg="sequence_mean", seq_ids=seq_ids)
    assert int(n) == expected_n == 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logp)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # token_mean over the same rows weighs tokens, not sequences: a different number here
    token_loss, token_n, _ = grpo_loss(logp, old, adv, mask)
    assert int(token_n) == int(mask.sum()) and abs(token_loss.item() / int(token_n) - loss.item() / 4) > 1e-4


def test_sequence_mean_without_ids_treats_each_row_as_one_sequence():
    logp, old, adv, mask, _, _ = _batch(b=4, s=6, seed=5)
    mask[2] = False  # an empty row is not a sequence
    loss, n, _ = grpo_loss(logp, old, adv, mask, agg="sequence_mean")
    expected, expected_n = _direct_loss(logp, old, adv, mask, agg="sequence_mean")
    assert int(n) == expected_n == 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _one_token(ratio: float, adv: float, **kw):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, _, stats = grpo_loss(logp, old, torch.tensor([[adv]]), torch.tensor([[True]]), **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad.item(), stats


@pytest.mark.parametrize(
    "ratio, adv, clipped_side",
    [
        (1.5, 1.0, "clip_high"),  # above 1 + clip_high with A > 0: clipped, no gradient
        (1.2, 1.0, None),  # inside the upper bound (0.28 > 0.2: clip-higher lets it move)
        (0.5, 1.0, None),  # below 1 - clip_low but A > 0: the unclipped term is the pessimistic one
        (0.5, -1.0, "clip_low"),  # below 1 - clip_low with A < 0: clipped, no gradient
        (0.9, -1.0, None),
        (1.5, -1.0, None),  # above the upper bound but A < 0: unclipped, gradient flows
    ],
)
def test_clipping_on_both_sides(ratio, adv, clipped_side):
    loss, grad, stats = _one_token(ratio, adv, clip_low=0.2, clip_high=0.28)
    if clipped_side == "clip_high":
        assert loss == pytest.approx(-adv * 1.28) and grad == 0.0
    elif clipped_side == "clip_low":
        assert loss == pytest.approx(-adv * 0.8) and grad == 0.0
    else:
        assert loss == pytest.approx(-adv * ratio, rel=1e-5)
        assert grad == pytest.approx(-adv * ratio, rel=1e-5)  # d/dlogp (-A exp(logp - old))
    assert stats["clip_high"].item() == (clipped_side == "clip_high")
    assert stats["clip_low"].item() == (clipped_side == "clip_low")
    assert stats["ratio"].item() == pytest.approx(ratio, rel=1e-5)


def test_tis_weight_is_truncated_and_reported():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-1.0, -2.0, -0.5]])  # weights 1, e, e^-0.5
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _, stats = grpo_loss(logp, old, adv, mask, engine_logp=engine, tis_cap=2.0)
    weights = [1.0, 2.0, math.exp(-0.5)]
    assert loss.item() == pytest.approx(-sum(weights), rel=1e-5)
    assert stats["tis_weight"].item() == pytest.approx(sum(weights), rel=1e-5)
    assert stats["tis_truncated"].item() == 1
    with pytest.raises(ValueError, match="tis_cap"):
        grpo_loss(logp, old, adv, mask, engine_logp=engine)


def test_stats_are_token_sums():
    logp, old, adv, mask, ref, _ = _batch(seed=7)
    ent = torch.rand_like(old)
    _, _, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.0, entropy=ent)
    kl = ratio = entropy = 0.0
    low = high = 0
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            if mask[i, t]:
                a, b, r = logp[i, t].item(), ref[i, t].item(), math.exp(logp[i, t].item() - old[i, t].item())
                kl += math.exp(b - a) - (b - a) - 1
                ratio += r
                entropy += ent[i, t].item()
                low += adv[i, t].item() < 0 and r < 0.8
                high += adv[i, t].item() > 0 and r > 1.28
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert stats["ratio"].item() == pytest.approx(ratio, rel=1e-5)
    assert stats["entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert (stats["clip_low"].item(), stats["clip_high"].item()) == (low, high)
    assert low > 0 and high > 0  # the batch exercises both sides
    assert all(not v.requires_grad for v in stats.values())


def test_masked_positions_never_reach_loss_or_gradient():
    logp, old, adv, mask, _, _ = _batch(seed=9)
    old = old.clone()
    old[~mask] = float("-inf")  # garbage at padding
    loss, _, _ = grpo_loss(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_grpo_loss_rejects_inconsistent_arguments():
    logp, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(logp, old, adv, mask, agg="batch_mean")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(logp, old[:, :3], adv, mask)
