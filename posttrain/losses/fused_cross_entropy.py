"""Fused linear cross-entropy: the LM loss and both of its gradients, one chunk of tokens at a time, in forward.

Per chunk of `c` trained positions: logits = h W^T (`[c, V]`, the matmul dtype), then one fused pass turns
them into the rows' losses and overwrites them with d loss / d logits (a Triton kernel on CUDA,
`ce_grad_kernel.py`; the compiled or eager `logit_math.ce_grad_` elsewhere and with soft-capping); then grad_h = g W and
grad_W += g^T h. Backward only scales the two finished gradients by the incoming scalar. Nothing is
recomputed, the `[tokens, vocab]` logits never exist, and the weight's gradient is one buffer in the weight's
dtype. Positions whose label is `ignore_index` are dropped before the projection.

Compared with `chunked_cross_entropy` (kept as `training.loss_impl = "chunked"`), which holds fp32 `[c, V]`
buffers and an fp32 copy of the head's gradient, this needs about one bf16 chunk of logits beyond the two
gradients themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.ce_grad_kernel import ce_grad_fn
from posttrain.losses.fused_head import (
    accumulate_grad_weight,
    chunk_rows,
    gathered,
    grad_weight_buffer,
    hand_over_grads,
    matmul_dtype,
    no_autocast,
)
from posttrain.losses.logit_math import ce_grad_, ce_rows, chunk_math
from posttrain.losses.targets import find_target_index

__all__ = ["fused_linear_cross_entropy"]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """loss_sum = sum_i CE(softcap(h_i W^T), y_i) over the selected positions i; gradients made in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,  # [T, D], all positions
        weight: Tensor,  # [Vp, D]
        positions: Tensor,  # [N] indices into hidden of the trained positions
        targets: Tensor,  # [N] in [0, vocab_size)
        vocab_size: int,
        chunk_size: int,
        softcap: float | None,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> Tensor:
        dtype = matmul_dtype(hidden, weight)
        rows = chunk_rows(chunk_size, vocab_size, torch.finfo(dtype).bits // 8)
        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
        grad_weight = grad_weight_buffer(weight, vocab_size, positions.numel()) if need_grad_weight else None
        loss_sum = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        with_grads = need_grad_hidden or need_grad_weight
        math = chunk_math(ce_grad_ if with_grads else ce_rows, hidden.device)
        if with_grads:
            math = ce_grad_fn(hidden.device, softcap, math)
        with no_autocast(hidden.device):
            w = weight[:vocab_size].to(dtype)
            for start in range(0, positions.numel(), rows):
                pos = positions[start : start + rows]
                tgt = targets[start : start + rows]
                h = hidden.index_select(0, pos).to(dtype)
                logits = h @ w.T
                loss_sum += math(logits, tgt, softcap).sum()
                if not with_grads:
                    continue
                if grad_hidden is not None:  # logits now hold d loss / d logits
                    grad_hidden.index_copy_(0, pos, (logits @ w).to(grad_hidden.dtype))
                if grad_weight is not None:
                    accumulate_grad_weight(grad_weight[:vocab_size], logits, h, overwrite=start == 0)
                del logits
        ctx.grads = (grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = hand_over_grads(ctx, grad_output, "fused_linear_cross_entropy")
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


@torch.compiler.disable
def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_size: int,
    chunk_size: int = 0,
    ignore_index: int = -100,
    softcap: float | None = None,
    target_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of `hidden @ weight[:vocab_size].T` against `labels`; `(loss_sum, n_tokens)`.

    Same contract as `chunked_cross_entropy` (labels already shifted, `ignore_index` untrained, rows of `weight`
    past `vocab_size` are padding and get zero gradient, fp32 loss (fp64 for fp64 inputs) and an int64 count).
    `chunk_size`: trained tokens projected at a time; 0 sizes chunks to about 320 MiB of logits.
    `softcap`: Gemma-style final logit soft-capping `softcap * tanh(z / softcap)` before the softmax.
    Gradients are made only for the inputs that require grad, and not at all under `torch.no_grad()`.
    `target_index`: the flat positions of the labels that are not `ignore_index` (`losses.find_target_index`, made on
    the host with the batch); without it they are found here, which waits for the device (their count sizes the pass).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must agree on all but the last dim"
        )
    weight = gathered(weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [padded_vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, weight.shape[0]={weight.shape[0]}]")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    chunk_rows(chunk_size, vocab_size, 2)  # validates chunk_size
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    positions = find_target_index(flat_labels, ignore_index) if target_index is None else target_index
    targets = flat_labels.index_select(0, positions)
    grad_enabled = torch.is_grad_enabled()
    loss_sum = _FusedLinearCrossEntropy.apply(
        flat_hidden, weight, positions, targets, vocab_size, chunk_size, softcap,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
    )
    # a fill kernel, not torch.tensor(..., device=): that host-to-device copy waits for the whole loss (a sync)
    n_tokens = torch.full((), positions.numel(), dtype=torch.int64, device=labels.device)
    return loss_sum, n_tokens
