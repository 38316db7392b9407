"""DPO-family and Bradley-Terry losses against direct computations; per-sequence log-probs of packed pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses.preference import (
    bradley_terry_loss,
    preference_loss,
    sequence_log_probs,
    sum_by_sequence,
)
from posttrain.losses.targets import find_target_index


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5  # policy / reference, chosen / rejected


def _tensors(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.float64) for v in values]


def test_sigmoid_dpo_matches_formula_and_rewards() -> None:
    beta = 0.2
    out = preference_loss(*_tensors(PC, PR, RC, RR), loss_type="sigmoid", beta=beta)
    h = (PC - RC) - (PR - RR)
    assert out.losses.item() == pytest.approx(-_log_sigmoid(beta * h))
    assert out.chosen_rewards.item() == pytest.approx(beta * (PC - RC))
    assert out.rejected_rewards.item() == pytest.approx(beta * (PR - RR))


def test_conservative_dpo_mixes_both_label_directions() -> None:
    beta, eps = 0.5, 0.1
    out = preference_loss(*_tensors(PC, PR, RC, RR), loss_type="sigmoid", beta=beta, label_smoothing=eps)
    h = (PC - RC) - (PR - RR)
    assert out.losses.item() == pytest.approx(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))


def test_ipo_is_squared_distance_to_half_inverse_beta() -> None:
    beta = 0.25
    out = preference_loss(*_tensors(PC, PR, RC, RR), loss_type="ipo", beta=beta)
    h = (PC - RC) - (PR - RR)
    assert out.losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*_tensors(PC, PR, RC, RR), loss_type="ipo", label_smoothing=0.1)


def test_simpo_is_reference_free_and_length_normalized() -> None:
    beta, gamma = 2.0, 0.3
    lengths = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([6])}
    out = preference_loss(*_tensors(PC, PR, RC, RR), loss_type="simpo", beta=beta, simpo_gamma=gamma, **lengths)
    x = beta * (PC / 4 - PR / 6) - gamma
    assert out.losses.item() == pytest.approx(-_log_sigmoid(x))
    assert out.chosen_rewards.item() == pytest.approx(beta * PC / 4)
    no_ref = preference_loss(*_tensors(PC, PR), loss_type="simpo", beta=beta, simpo_gamma=gamma, **lengths)
    assert torch.equal(no_ref.losses, out.losses)  # the reference is ignored
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(*_tensors(PC, PR), loss_type="simpo")


def test_no_reference_means_reference_log_prob_zero_and_gradients_flow() -> None:
    pc, pr = (torch.tensor([PC], requires_grad=True), torch.tensor([PR], requires_grad=True))
    out = preference_loss(pc, pr, None, None, beta=0.1)
    assert out.losses.item() == pytest.approx(-_log_sigmoid(0.1 * (PC - PR)))
    out.losses.sum().backward()
    expected = -0.1 * torch.sigmoid(torch.tensor(-0.1 * (PC - PR))).item()
    assert pc.grad.item() == pytest.approx(expected)
    assert pr.grad.item() == pytest.approx(-expected)


def test_policy_equal_to_reference_gives_log_two_and_zero_rewards() -> None:
    x = torch.randn(5)
    y = torch.randn(5)
    out = preference_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2.0)))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_bradley_terry_loss() -> None:
    c, r = torch.tensor([1.5, -0.2]), torch.tensor([0.5, 0.3])
    assert torch.allclose(bradley_terry_loss(c, r), -F.logsigmoid(c - r))
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_sum_by_sequence() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sum_by_sequence(values, torch.tensor([0, 2, 0, 2]), 4).tolist() == [4.0, 0.0, 6.0, 0.0]


@pytest.mark.parametrize("host_index", [False, True])
def test_sequence_log_probs_match_direct_log_softmax_with_masking(host_index: bool) -> None:
    torch.manual_seed(0)
    vocab, padded, dim = 11, 16, 8
    hidden = torch.randn(2, 7, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, dim, dtype=torch.float64)
    labels = torch.tensor([[3, 4, -100, 5, 1, -100, -100], [-100, 2, 2, -100, 7, 8, -100]])
    # Row 0: seq 0 (positions 0-2), seq 1 (3-4), padding; row 1: seq 2 (0-3), seq 3 (4-5), padding.
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 2, 2, 3, 3, -1]])
    sums, counts = sequence_log_probs(
        hidden, weight, labels=labels, sequence_ids=sequence_ids, n_sequences=4, vocab_size=vocab, chunk_size=3,
        target_index=find_target_index(labels) if host_index else None,  # as pack_pairs' batches carry it
    )
    logp = torch.log_softmax(hidden @ weight[:vocab].T, dim=-1)
    expected = torch.zeros(4, dtype=torch.float64)
    for b in range(2):
        for s in range(7):
            if labels[b, s] != -100:
                expected[sequence_ids[b, s]] += logp[b, s, labels[b, s]]
    assert torch.allclose(sums, expected)
    assert counts.tolist() == [2, 2, 2, 2]
    sums.sum().backward()
    assert hidden.grad[0, 2].abs().sum() == 0 and hidden.grad[1, 6].abs().sum() == 0  # unlabelled: no gradient


def test_sequence_log_probs_reject_labels_on_padding() -> None:
    hidden, weight = torch.randn(1, 3, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="sequence id -1"):
        sequence_log_probs(hidden, weight, labels=torch.tensor([[1, 2, 3]]), sequence_ids=torch.tensor([[0, 0, -1]]),
                           n_sequences=1, vocab_size=8)
