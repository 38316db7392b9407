"""Chunked cross-entropy and per-token log-probs over the output projection.

The `[tokens, vocab]` logits of a modern LLM are the largest activation of a training step (16k tokens x
152k vocab in fp32 is 10 GB). These functions take the final hidden states and the output weight instead of
logits, and project a chunk of tokens at a time:

* `chunked_cross_entropy` computes the loss *and its gradients* in forward, chunk by chunk, so nothing
  per-chunk is kept for backward; backward only scales the two stored gradients by `grad_output`.
* `token_log_probs` recomputes each chunk's logits in backward (activation checkpointing per chunk); it is
  the building block for DPO / GRPO where the loss is a function of per-token log-probs.

Positions whose label is `ignore_index` are dropped before any projection, so prompt and padding tokens cost
nothing. Rows of `weight` at and beyond `vocab_size` (padding of the vocabulary to a multiple of 64) are never
used and get zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.losses.fused_head import accumulate_grad_weight

__all__ = ["DEFAULT_CHUNK_SIZE", "chunked_cross_entropy", "token_log_probs"]

DEFAULT_CHUNK_SIZE = 4096  # what chunk_size=0 means here


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax math runs in at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """loss_sum = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] over selected positions i.

    Gradients are computed in forward and kept on ctx; backward scales them in place and hands them over,
    so a second backward through the same graph (retain_graph) is refused.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,  # [T, D], all positions (flattened)
        weight: Tensor,  # [Vp, D]
        positions: Tensor,  # [N] long, indices into hidden of the trained positions
        targets: Tensor,  # [N] long, in [0, vocab_size)
        vocab_size: int,
        chunk_size: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> Tensor:
        matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        acc_dtype = _compute_dtype(matmul_dtype)
        w = weight[:vocab_size]
        if w.dtype != matmul_dtype:
            w = w.to(matmul_dtype)

        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
        # fp32 accumulator over chunks; padded vocab rows stay zero.
        grad_weight = (
            torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)
            if need_grad_weight
            else None
        )
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)

        for start in range(0, positions.numel(), chunk_size):
            pos = positions[start : start + chunk_size]
            tgt = targets[start : start + chunk_size]
            h = hidden.index_select(0, pos)
            if h.dtype != matmul_dtype:
                h = h.to(matmul_dtype)
            logits = h @ w.T  # [c, V] in the input dtype
            target_logits = logits.gather(1, tgt[:, None]).to(acc_dtype)
            # One fp32 [c, V] buffer, reused in place: exp(logits - max), then softmax, then its gradient.
            # (log_softmax(dtype=float32) would keep a second fp32 copy of a bf16 input alive.)
            probs = logits.to(acc_dtype)
            del logits
            row_max = probs.amax(dim=-1, keepdim=True)
            sum_exp = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            loss_sum += (row_max + sum_exp.log() - target_logits).sum()
            if not (need_grad_hidden or need_grad_weight):
                continue
            # d loss / d logits = softmax - onehot(target), cast once to the matmul dtype.
            probs.div_(sum_exp)
            probs[torch.arange(probs.shape[0], device=probs.device), tgt] -= 1.0
            grad_logits = probs.to(matmul_dtype)
            del probs
            if need_grad_hidden:
                grad_hidden.index_copy_(0, pos, (grad_logits @ w).to(grad_hidden.dtype))
            if need_grad_weight:
                accumulate_grad_weight(grad_weight[:vocab_size], grad_logits, h)

        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = grad_weight
        ctx.backward_done = False
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError(
                "chunked_cross_entropy supports one backward per forward: its gradients are computed in "
                "forward and scaled in place. Run the forward again instead of retain_graph=True."
            )
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # hand the buffers to autograd, no copies
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            grad_weight.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _check_shapes(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int, chunk_size: int) -> None:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on all but the last dim"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [padded_vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, weight.shape[0]={weight.shape[0]}]")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = {DEFAULT_CHUNK_SIZE}), got {chunk_size}")


@torch.compiler.disable
def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_size: int,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of `hidden @ weight[:vocab_size].T` against `labels`.

    Args:
        hidden: `[..., D]` final hidden states (after the final norm).
        weight: `[padded_vocab, D]` output projection (may be frozen or tied to the embedding).
        labels: `[...]` target ids, already shifted; `ignore_index` marks untrained positions.
        vocab_size: the real vocabulary size; rows of `weight` beyond it are padding and never scored.
        chunk_size: trained tokens projected at a time (0: 4096); peak extra memory is about
            `chunk_size * vocab_size * (4 + itemsize)` bytes.

    Returns:
        `(loss_sum, n_tokens)`: a 0-d fp32 loss (fp64 for fp64 inputs) summed over trained positions and a
        0-d int64 count of them.
        Divide by the global token count across micro-batches and ranks (not per micro-batch) to get a mean.

    Labels outside `[0, vocab_size)` other than `ignore_index` are an error (index out of range).
    Gradients for `hidden` / `weight` are computed only for those that require grad; they are computed in
    forward, so calling this under `torch.no_grad()` skips them entirely.
    """
    _check_shapes(hidden, weight, labels, vocab_size, chunk_size)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != ignore_index).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, positions)
    grad_enabled = torch.is_grad_enabled()
    loss_sum = _ChunkedCrossEntropy.apply(
        flat_hidden,
        weight,
        positions,
        targets,
        vocab_size,
        chunk_size,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )
    # a fill kernel, not torch.tensor(..., device=): that host-to-device copy waits for the whole loss (a sync)
    n_tokens = torch.full((), positions.numel(), dtype=torch.int64, device=labels.device)
    return loss_sum, n_tokens


def _chunk_log_probs(h: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, temperature: float) -> Tensor:
    w = weight[:vocab_size]
    matmul_dtype = torch.promote_types(h.dtype, w.dtype)
    logits = (h.to(matmul_dtype) @ w.to(matmul_dtype).T).to(_compute_dtype(matmul_dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


@torch.compiler.disable
def token_log_probs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    vocab_size: int,
    chunk_size: int = 4096,
    ignore_index: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token `log softmax(hidden @ weight[:vocab_size].T / temperature)[target]`, in fp32.

    `hidden` is `[..., D]` and `target_ids` `[...]`; the result has `target_ids`' shape. Logits are built one
    chunk of `chunk_size` tokens at a time; with grad enabled each chunk is checkpointed, so backward
    recomputes that chunk's logits instead of storing them. Positions equal to `ignore_index` (when given)
    return 0.0 and receive no gradient. Callers that only need a subset of positions should select them
    first: every position passed in is projected.
    """
    if hidden.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and target_ids {tuple(target_ids.shape)} must agree on all but the "
            "last dim"
        )
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, weight.shape[0]={weight.shape[0]}]")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = {DEFAULT_CHUNK_SIZE}), got {chunk_size}")
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1)
    ignored = None
    if ignore_index is not None:
        ignored = flat_targets == ignore_index
        flat_targets = flat_targets.masked_fill(ignored, 0)
    use_checkpoint = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, flat_targets.numel(), chunk_size):
        h = flat_hidden[start : start + chunk_size]
        t = flat_targets[start : start + chunk_size]
        if use_checkpoint:
            pieces.append(
                checkpoint(_chunk_log_probs, h, weight, t, vocab_size, temperature, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_log_probs(h, weight, t, vocab_size, temperature))
    if pieces:
        log_probs = torch.cat(pieces)
    else:
        log_probs = torch.zeros(0, dtype=_compute_dtype(hidden.dtype), device=hidden.device)
    if ignored is not None:
        log_probs = log_probs.masked_fill(ignored, 0.0)
    return log_probs.reshape(target_ids.shape)
