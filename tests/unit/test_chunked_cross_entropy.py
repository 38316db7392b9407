"""chunked_cross_entropy / token_log_probs equal the full-logits reference, in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import chunked_cross_entropy, token_log_probs

D = 16
VOCAB = 50
PADDED_VOCAB = 64


def _inputs(shape=(3, 7), dtype=torch.float32, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, dtype=dtype)
    weight = torch.randn(PADDED_VOCAB, D, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _reference(hidden, weight, labels):
    logits = hidden @ weight[:VOCAB].T
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum", ignore_index=-100)
    return loss, int((labels != -100).sum())


def _loss_and_grads(fn, hidden, weight, labels):
    h = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss, n = fn(h, w, labels)
    loss.backward()
    return loss.detach(), n, h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 8, 4096])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_full_logits_cross_entropy(chunk_size, dtype, tol):
    hidden, weight, labels = _inputs(dtype=dtype)
    loss, n, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=chunk_size), hidden, weight, labels
    )
    ref_loss, ref_n, ref_gh, ref_gw = _loss_and_grads(_reference, hidden, weight, labels)
    assert int(n) == ref_n and n.dtype == torch.int64
    assert loss.dim() == 0 and loss.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(gh, ref_gh, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, ref_gw, rtol=tol, atol=tol)


def test_padded_vocab_rows_get_zero_grad_and_are_never_scored():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        weight[VOCAB:] = 100.0  # would dominate logsumexp if padded rows were scored
    loss, _, _, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=4), hidden, weight, labels
    )
    ref_loss, _, _, _ = _loss_and_grads(_reference, hidden, weight, labels)
    torch.testing.assert_close(loss, ref_loss)
    assert gw.shape == (PADDED_VOCAB, D)
    assert torch.all(gw[VOCAB:] == 0)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels = _inputs()
    labels.fill_(-100)
    loss, n, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB), hidden, weight, labels
    )
    assert int(n) == 0 and float(loss) == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_single_target_and_only_its_position_gets_grad():
    hidden, weight, labels = _inputs()
    labels.fill_(-100)
    labels[1, 3] = 7
    loss, n, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=2), hidden, weight, labels
    )
    ref_loss, _, ref_gh, ref_gw = _loss_and_grads(_reference, hidden, weight, labels)
    assert int(n) == 1
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)
    nonzero_rows = gh.abs().sum(-1).nonzero().tolist()
    assert nonzero_rows == [[1, 3]]


def test_custom_ignore_index():
    hidden, weight, labels = _inputs(ignore_frac=0.0)
    labels[0] = -1
    loss, n = chunked_cross_entropy(hidden, weight, labels, vocab_size=VOCAB, ignore_index=-1)
    ref = F.cross_entropy((hidden @ weight[:VOCAB].T).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-1,
                          reduction="sum")
    assert int(n) == labels[1:].numel()
    torch.testing.assert_close(loss, ref)


def test_frozen_weight_gives_hidden_grad_only():
    hidden, weight, labels = _inputs()
    weight.requires_grad_(False)
    loss, _, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=3), hidden, weight, labels
    )
    ref_loss, _, ref_gh, _ = _loss_and_grads(_reference, hidden, weight, labels)
    assert gw is None
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(gh, ref_gh)


def test_hidden_without_grad_gives_weight_grad_only():
    hidden, weight, labels = _inputs()
    hidden.requires_grad_(False)
    _, _, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, vocab_size=VOCAB, chunk_size=3), hidden, weight, labels
    )
    _, _, _, ref_gw = _loss_and_grads(_reference, hidden, weight, labels)
    assert gh is None
    torch.testing.assert_close(gw, ref_gw)


def test_no_grad_returns_loss_without_graph():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, labels, vocab_size=VOCAB, chunk_size=4)
    ref_loss, _ = _reference(hidden.detach(), weight.detach(), labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss)


def test_grad_output_scales_grads():
    """The caller divides loss_sum by a global token count: backward must honour that scale."""
    hidden, weight, labels = _inputs()
    scale = 0.37
    h1, w1 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (chunked_cross_entropy(h1, w1, labels, vocab_size=VOCAB, chunk_size=5)[0] * scale).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (_reference(h2, w2, labels)[0] * scale).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_second_backward_through_same_graph_is_refused():
    hidden, weight, labels = _inputs()
    loss, _ = chunked_cross_entropy(hidden, weight, labels, vocab_size=VOCAB)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_micro_batch_invariance():
    """Summing loss and grads over two halves of a batch equals the whole batch at once."""
    hidden, weight, labels = _inputs(shape=(4, 9), dtype=torch.float64)
    w_whole = weight.detach().clone().requires_grad_()
    h_whole = hidden.detach().clone().requires_grad_()
    loss_whole, n_whole = chunked_cross_entropy(h_whole, w_whole, labels, vocab_size=VOCAB, chunk_size=5)
    loss_whole.backward()

    w_split = weight.detach().clone().requires_grad_()
    h_split = hidden.detach().clone().requires_grad_()
    total_loss, total_n = 0.0, 0
    for rows in (slice(0, 2), slice(2, 4)):
        loss, n = chunked_cross_entropy(h_split[rows], w_split, labels[rows], vocab_size=VOCAB, chunk_size=5)
        loss.backward()
        total_loss += loss.detach()
        total_n += int(n)
    assert total_n == int(n_whole)
    torch.testing.assert_close(total_loss, loss_whole.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_split.grad, w_whole.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_split.grad, h_whole.grad, rtol=1e-12, atol=1e-12)


def test_bfloat16_close_to_fp32_reference():
    hidden, weight, labels = _inputs(shape=(2, 33))
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss, _ = chunked_cross_entropy(hb, wb, labels, vocab_size=VOCAB, chunk_size=8)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref_loss, _, ref_gh, ref_gw = _loss_and_grads(
        _reference, hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_(), labels
    )
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(hb.grad.float(), ref_gh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(wb.grad.float(), ref_gw, rtol=5e-2, atol=5e-2)


def test_rejects_mismatched_shapes():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_cross_entropy(hidden, weight, labels, vocab_size=PADDED_VOCAB + 1)


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_token_log_probs_matches_log_softmax_with_grads(chunk_size):
    hidden, weight, _ = _inputs(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, VOCAB, hidden.shape[:-1], generator=g)
    coeffs = torch.randn(targets.shape, generator=g, dtype=torch.float64)

    h1, w1 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    lp = token_log_probs(h1, w1, targets, vocab_size=VOCAB, chunk_size=chunk_size)
    (lp * coeffs).sum().backward()

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.log_softmax(h2 @ w2[:VOCAB].T, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * coeffs).sum().backward()

    assert lp.shape == targets.shape
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(w1.grad[VOCAB:] == 0)


def test_token_log_probs_ignore_index_and_temperature():
    hidden, weight, _ = _inputs()
    targets = torch.randint(0, VOCAB, hidden.shape[:-1])
    targets[0, :2] = -100
    lp = token_log_probs(hidden, weight, targets, vocab_size=VOCAB, chunk_size=4, ignore_index=-100, temperature=0.7)
    logits = (hidden @ weight[:VOCAB].T) / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = ref.masked_fill(targets == -100, 0.0)
    torch.testing.assert_close(lp, ref)
    lp.sum().backward()
    assert torch.all(hidden.grad[0, :2] == 0)


def test_chunked_cross_entropy_inside_compiled_caller():
    """Runs eagerly (compiler-disabled) when called from a torch.compile'd function."""
    hidden, weight, labels = _inputs()

    @torch.compile(backend="eager")
    def compiled_loss(h, w, y):
        loss, n = chunked_cross_entropy(h * 1.0, w, y, vocab_size=VOCAB, chunk_size=4)
        return loss / n

    out = compiled_loss(hidden, weight, labels)
    ref_loss, ref_n = _reference(hidden, weight, labels)
    torch.testing.assert_close(out, ref_loss / ref_n)
    out.backward()
    assert hidden.grad is not None and weight.grad is not None
