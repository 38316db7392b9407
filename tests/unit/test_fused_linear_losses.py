"""The fused head losses equal the naive full-logits computation, in values and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses.distillation import DIVERGENCES, token_divergence
from posttrain.losses.fused_cross_entropy import fused_linear_cross_entropy
from posttrain.losses.fused_distillation import fused_distillation_loss
from posttrain.losses.fused_head import chunk_rows
from posttrain.losses.fused_log_probs import fused_token_log_probs
from posttrain.losses.targets import find_target_index

D = 16
VOCAB = 50
PADDED_VOCAB = 64


def _inputs(shape=(3, 7), dtype=torch.float64, seed=0, ignore_frac=0.3, dim=D):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=g, dtype=dtype)
    weight = torch.randn(PADDED_VOCAB, dim, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


def _grads(fn, hidden, weight, *rest, weight_grad=True):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight_grad)
    out = fn(h, w, *rest)
    out.backward()
    return out.detach(), h.grad, w.grad


def _capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _naive_ce(h, w, labels, softcap=None):
    logits = _capped(h @ w[:VOCAB].T, softcap)
    return F.cross_entropy(logits.reshape(-1, VOCAB).double(), labels.reshape(-1), reduction="sum")


@pytest.mark.parametrize("host_index", [False, True])
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 5, 4096])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cross_entropy_matches_naive_in_loss_and_grads(chunk_size, softcap, host_index):
    hidden, weight, labels = _inputs()
    scale = 0.37  # backward scales the gradients made in forward by the incoming gradient
    index = find_target_index(labels) if host_index else None  # as the SFT batches carry it
    loss, gh, gw = _grads(
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=chunk_size,
                                                   softcap=softcap, target_index=index)[0] * scale,
        hidden, weight, labels)
    ref, rgh, rgw = _grads(lambda h, w, y: _naive_ce(h, w, y, softcap) * scale, hidden, weight, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rgh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-10, atol=1e-12)
    assert gw[VOCAB:].abs().max() == 0  # padding rows of the vocabulary get no gradient


def test_cross_entropy_bf16_within_bf16_tolerance_and_weight_grad_in_weight_dtype():
    hidden, weight, labels = _inputs(shape=(4, 33), dtype=torch.float32, ignore_frac=0.0)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    loss, gh, gw = _grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=16)[0],
                          hb, wb, labels)
    ref, rgh, rgw = _grads(_naive_ce, hidden, weight, labels)  # fp32 naive
    assert gw.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref.double(), rtol=2e-2, atol=0)
    torch.testing.assert_close(gh.float(), rgh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gw.float(), rgw, rtol=5e-2, atol=5e-2)


def test_cross_entropy_drops_ignored_tokens_and_counts_targets():
    hidden, weight, labels = _inputs()
    loss, n = fused_linear_cross_entropy(hidden, weight, labels, vocab_size=VOCAB, chunk_size=4)
    assert n.dtype == torch.int64 and int(n) == int((labels != -100).sum())
    h2 = hidden.clone()
    h2[labels == -100] = 1e6  # ignored positions are never projected: huge values there change nothing
    loss2, _ = fused_linear_cross_entropy(h2, weight, labels, vocab_size=VOCAB, chunk_size=4)
    torch.testing.assert_close(loss, loss2)
    empty = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_()
    loss0, n0 = fused_linear_cross_entropy(h, weight, empty, vocab_size=VOCAB)
    loss0.backward()
    assert float(loss0.detach()) == 0 and int(n0) == 0 and h.grad.abs().max() == 0


def test_cross_entropy_frozen_weight_no_grad_and_single_backward():
    hidden, weight, labels = _inputs()
    _, gh, gw = _grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, vocab_size=VOCAB)[0], hidden, weight,
                       labels, weight_grad=False)
    assert gw is None and gh is not None
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, vocab_size=VOCAB)
    torch.testing.assert_close(loss, _naive_ce(hidden, weight, labels))
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_cross_entropy(h, weight, labels, vocab_size=VOCAB)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_cross_entropy_under_cpu_autocast_projects_in_bf16_and_keeps_fp32_weight_grad():
    hidden, weight, labels = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = _grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, vocab_size=VOCAB)[0],
                              hidden, weight, labels)
    ref, _, rgw = _grads(_naive_ce, hidden, weight, labels)
    assert gw.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(gw, rgw.float(), rtol=5e-2, atol=5e-2)


def test_bad_arguments_name_the_problem():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="must agree"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=PADDED_VOCAB + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=VOCAB, chunk_size=-1)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=VOCAB, softcap=0.0)


def test_auto_chunk_rows_fit_the_byte_budget():
    assert chunk_rows(0, 151936, 2) == 1024
    assert chunk_rows(0, 262144, 2) == 640
    assert chunk_rows(0, 10**9, 4) == 128  # never fewer than 128 rows
    assert chunk_rows(7, 151936, 2) == 7


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 2.5)])
def test_token_log_probs_and_entropy_match_log_softmax(temperature, softcap):
    hidden, weight, labels = _inputs(ignore_frac=0.0)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(labels.shape, generator=g, dtype=torch.float64)  # any per-token weights

    def fused(h, w, y):
        lp, ent = fused_token_log_probs(h, w, y, vocab_size=VOCAB, chunk_size=4, temperature=temperature,
                                        softcap=softcap, entropy=True)
        fused.entropy = ent
        return (lp * upstream).sum()

    def naive(h, w, y):
        logp = torch.log_softmax(_capped(h @ w[:VOCAB].T, softcap) / temperature, dim=-1)
        naive.entropy = -(logp.exp() * logp).sum(-1).detach()
        return (logp.gather(-1, y[..., None]).squeeze(-1) * upstream).sum()

    out, gh, gw = _grads(fused, hidden, weight, labels)
    ref, rgh, rgw = _grads(naive, hidden, weight, labels)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rgh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.entropy, naive.entropy, rtol=1e-12, atol=1e-12)
    assert not fused.entropy.requires_grad


def test_token_log_probs_ignore_index_gives_zero_and_no_grad():
    hidden, weight, labels = _inputs()
    h = hidden.clone().requires_grad_()
    lp = fused_token_log_probs(h, weight, labels, vocab_size=VOCAB, ignore_index=-100)
    assert lp.shape == labels.shape and (lp[labels == -100] == 0).all()
    lp.sum().backward()
    assert h.grad[labels == -100].abs().max() == 0 and h.grad[labels != -100].abs().max() > 0


@pytest.mark.parametrize("host_index", [False, True])
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_matches_naive_two_head_loss(kind, temperature, host_index):
    hidden, weight, labels = _inputs()
    teacher_hidden, teacher_weight, _ = _inputs(seed=5, dim=24)
    ce_weight = 0.3
    index = find_target_index(labels) if host_index else None  # as the SFT batches carry it

    def fused(h, w, y):
        loss, div, ce, kl, n = fused_distillation_loss(
            h, w, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=y, vocab_size=VOCAB,
            kind=kind, temperature=temperature, jsd_beta=0.3, ce_weight=ce_weight, chunk_size=4,
            target_index=index)
        fused.metrics = (div, ce, kl, n)
        return loss * 0.5

    def naive(h, w, y):
        keep = y != -100
        s = h[keep] @ w[:VOCAB].T
        t = teacher_hidden[keep] @ teacher_weight[:VOCAB].T
        div = token_divergence(s.double(), t.double(), kind=kind, temperature=temperature, jsd_beta=0.3).sum()
        ce = F.cross_entropy(s.double(), y[keep], reduction="sum")
        kl = token_divergence(s.double(), t.double(), kind="forward_kl").sum()
        naive.metrics = (div.detach(), ce.detach(), kl.detach(), int(keep.sum()))
        return (ce_weight * ce + (1 - ce_weight) * div) * 0.5

    out, gh, gw = _grads(fused, hidden, weight, labels)
    ref, rgh, rgw = _grads(naive, hidden, weight, labels)
    # token_divergence works in fp32: the reference is exact to fp32 only
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rgh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused.metrics[:3], naive.metrics[:3]):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)
    assert int(fused.metrics[3]) == naive.metrics[3]


def test_a_sharded_head_passed_as_a_dtensor_is_gathered_with_its_gradient(tmp_path):
    """Outside a module's forward an FSDP / TP head is a DTensor: the loss gathers it and the gradient comes
    back as a DTensor of the same layout."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    hidden, weight, labels = _inputs()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        h = hidden.clone().requires_grad_()
        loss, _ = fused_linear_cross_entropy(h, w, labels, vocab_size=VOCAB, chunk_size=4)
        loss.backward()
        ref, rgh, rgw = _grads(_naive_ce, hidden, weight, labels)
        assert isinstance(w.grad, DTensor) and w.grad.placements == (Shard(0),)
        torch.testing.assert_close(loss.detach(), ref)
        torch.testing.assert_close(w.grad.full_tensor(), rgw)
        torch.testing.assert_close(h.grad, rgh)
    finally:
        dist.destroy_process_group()


def test_sft_loss_with_the_batch_target_index_equals_finding_it():
    """sft_loss hands the collate's target_index to the fused loss: same loss and gradients as without it."""
    from posttrain.models.registry import get_model_spec, resolve_scratch_args
    from posttrain.recipes.sft import sft_loss

    spec = get_model_spec("llama3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 32, "n_layers": 1, "ffn_dim": 64, "attn_backend": "sdpa"})
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (2, 24), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :7] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(24).expand(2, 24), "document_ids": None}
    results = []
    for with_index in (False, True):
        model.zero_grad()
        b = {**batch, "target_index": find_target_index(labels)} if with_index else batch
        out = sft_loss(model, b, torch.tensor(0), chunk_size=5)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), int(out.n_targets), [p.grad.clone() for p in model.parameters()]))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == int((labels != -100).sum())
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("ignored", [0.3, 1.0])
def test_the_head_gradient_buffer_is_written_not_assumed_zero(monkeypatch, ignored):
    """The buffer starts uninitialised (no fill of [V, D]): NaN stands in for that memory; the first chunk overwrites
    its rows, the padded rows and a batch without targets are zeroed."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: real_empty_like(x, **kw).fill_(float("nan")))
    hidden, weight, labels = _inputs(ignore_frac=ignored)
    teacher = dict(teacher_hidden=hidden * 0.5, teacher_weight=weight.flip(0))
    cases = {
        "cross_entropy": (lambda h, w, y: fused_linear_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=4)[0],
                          _naive_ce),
        "log_probs": (lambda h, w, y: fused_token_log_probs(h, w, y.clamp_min(0), vocab_size=VOCAB, chunk_size=4).sum(),
                      lambda h, w, y: torch.log_softmax(h @ w[:VOCAB].T, -1).gather(-1, y.clamp_min(0)[..., None]).sum()),
        "distillation": (lambda h, w, y: fused_distillation_loss(h, w, labels=y, vocab_size=VOCAB, chunk_size=4,
                                                                 **teacher)[0], None),
    }
    for name, (fn, ref_fn) in cases.items():
        _, _, gw = _grads(fn, hidden, weight, labels)
        assert torch.isfinite(gw).all() and gw[VOCAB:].abs().max() == 0, name
        if ref_fn is not None:
            torch.testing.assert_close(gw, _grads(ref_fn, hidden, weight, labels)[2], rtol=1e-10, atol=1e-12, msg=name)
        elif ignored == 1.0:
            assert gw.abs().max() == 0, name
