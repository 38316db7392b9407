"""Fused distillation loss over two heads: the student's and the teacher's logits a chunk of positions at a time.

The trained quantity is `ce_weight * CE + (1 - ce_weight) * divergence` summed over trained positions (see
`posttrain.losses.distillation` for the divergences), a scalar whose upstream gradient is one number; so, as
in the fused cross-entropy, the gradients for the student's hidden states and head weight are made in forward
and only scaled in backward. Per chunk: the student's and the teacher's `[c, V]` logits in the matmul dtype
(the student's buffer is overwritten with its gradient), nothing else of vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.distillation import DIVERGENCES
from posttrain.losses.fused_head import (
    accumulate_grad_weight,
    chunk_rows,
    gathered,
    grad_weight_buffer,
    hand_over_grads,
    matmul_dtype,
    no_autocast,
)
from posttrain.losses.logit_math import chunk_math, distill_grad_, distill_rows
from posttrain.losses.targets import find_target_index

__all__ = ["fused_distillation_loss"]


class _FusedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_hidden: Tensor,  # [T, Ds]
        student_weight: Tensor,  # [Vs, Ds]
        teacher_hidden: Tensor,  # [T, Dt], no grad
        teacher_weight: Tensor,  # [Vt, Dt], no grad
        positions: Tensor,
        targets: Tensor,
        settings: tuple,  # (vocab_size, chunk_size, kind, temperature, jsd_beta, ce_weight)
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        vocab_size, chunk_size, kind, temperature, jsd_beta, ce_weight = settings
        dtype = matmul_dtype(student_hidden, student_weight)
        teacher_dtype = matmul_dtype(teacher_hidden, teacher_weight)
        itemsize = (torch.finfo(dtype).bits + torch.finfo(teacher_dtype).bits) // 8
        rows = chunk_rows(chunk_size, vocab_size, itemsize)
        acc = torch.promote_types(dtype, torch.float32)
        sums = torch.zeros(3, dtype=acc, device=student_hidden.device)  # divergence, ce, forward KL at T=1
        grad_hidden = torch.zeros_like(student_hidden) if need_grad_hidden else None
        grad_weight = grad_weight_buffer(student_weight, vocab_size, positions.numel()) if need_grad_weight else None
        with_grads = need_grad_hidden or need_grad_weight
        math = chunk_math(distill_grad_ if with_grads else distill_rows, student_hidden.device)
        extra = (ce_weight,) if with_grads else ()
        with no_autocast(student_hidden.device):
            ws = student_weight[:vocab_size].to(dtype)
            wt = teacher_weight[:vocab_size].to(teacher_dtype)
            for start in range(0, positions.numel(), rows):
                pos = positions[start : start + rows]
                tgt = targets[start : start + rows]
                h = student_hidden.index_select(0, pos).to(dtype)
                student_logits = h @ ws.T
                teacher_logits = teacher_hidden.index_select(0, pos).to(teacher_dtype) @ wt.T
                div, ce, kl = math(student_logits, teacher_logits, tgt, kind, temperature, jsd_beta, *extra)
                del teacher_logits
                sums += torch.stack([div.sum(), ce.sum(), kl.sum()]).to(acc)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, pos, (student_logits @ ws).to(grad_hidden.dtype))
                if grad_weight is not None:
                    accumulate_grad_weight(grad_weight[:vocab_size], student_logits, h, overwrite=start == 0)
                del student_logits
        ctx.grads = (grad_hidden, grad_weight)
        div_sum, ce_sum, kl_sum = (s.clone() for s in sums.unbind())
        loss = ce_weight * ce_sum + (1 - ce_weight) * div_sum
        ctx.mark_non_differentiable(div_sum, ce_sum, kl_sum)
        return loss, div_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, *_):  # type: ignore[override]
        grad_hidden, grad_weight = hand_over_grads(ctx, grad_loss, "fused_distillation_loss")
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


@torch.compiler.disable
def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    vocab_size: int,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    ce_weight: float = 0.0,
    chunk_size: int = 0,
    ignore_index: int = -100,
    target_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(loss_sum, divergence_sum, ce_sum, kl_sum, n_tokens)` over the trained positions.

    `loss_sum = ce_weight * ce_sum + (1 - ce_weight) * divergence_sum` is the differentiable output (student
    side only); the other sums are detached metrics (`kl_sum`: forward KL(teacher || student) at temperature
    1). Arguments as in `chunked_distillation_loss`; the student's two tensors come first so this can be a
    model's `output_fn`. `chunk_size` 0 sizes chunks to about 320 MiB of the two models' logits.
    `target_index`: the trained positions made on the host, as for `fused_linear_cross_entropy` (no device sync).
    """
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)}, teacher hidden {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must agree on all but the last dim"
        )
    student_weight, teacher_weight = gathered(student_weight), gathered(teacher_weight).detach()
    if not (0 < vocab_size <= student_weight.shape[0] and vocab_size <= teacher_weight.shape[0]):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, min(student rows {student_weight.shape[0]}, teacher rows "
            f"{teacher_weight.shape[0]})]"
        )
    if kind not in DIVERGENCES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    chunk_rows(chunk_size, vocab_size, 2)  # validates chunk_size
    flat_labels = labels.reshape(-1)
    positions = find_target_index(flat_labels, ignore_index) if target_index is None else target_index
    targets = flat_labels.index_select(0, positions)
    grad_enabled = torch.is_grad_enabled()
    settings = (vocab_size, chunk_size, kind, float(temperature), float(jsd_beta), float(ce_weight))
    loss, div, ce, kl = _FusedDistillation.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight, positions, targets, settings,
        grad_enabled and student_hidden.requires_grad, grad_enabled and student_weight.requires_grad,
    )
    # a fill kernel, not torch.tensor(..., device=): that host-to-device copy waits for the whole loss (a sync)
    n_tokens = torch.full((), positions.numel(), dtype=torch.int64, device=labels.device)
    return loss, div, ce, kl, n_tokens
