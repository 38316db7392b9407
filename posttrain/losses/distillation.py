"""Knowledge-distillation losses over the vocabulary, computed chunk by chunk from hidden states.

`token_divergence` is the per-token math on logits (small tensors, easy to test). `chunked_distillation_loss`
takes the student's and the teacher's final hidden states and output weights instead of logits and projects
`chunk_size` trained positions at a time; each chunk is checkpointed, so neither model's `[tokens, vocab]`
logits ever exist whole, in forward or in backward.

Divergences (P = teacher, Q = student, both softened by `temperature` and scaled by temperature^2 so the
gradient size does not depend on it, as in Hinton et al. 2015):
- ``forward_kl``: KL(P || Q) = sum P (log P - log Q)  (mean-seeking; the classic distillation loss)
- ``reverse_kl``: KL(Q || P)  (mode-seeking)
- ``jsd``: generalized Jensen-Shannon with M = beta P + (1 - beta) Q:
  beta KL(P || M) + (1 - beta) KL(Q || M)  (GKD, Agarwal et al. 2024; bounded, symmetric at beta = 0.5)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["DIVERGENCES", "chunked_distillation_loss", "token_divergence"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, *, kind: str = "forward_kl", temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Per-position divergence `[N]` between teacher and student distributions over the last dim (fp32)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
        log_m = torch.logsumexp(torch.stack([log_p + math.log(jsd_beta), log_q + math.log(1 - jsd_beta)]), dim=0)
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        div = jsd_beta * kl_pm + (1 - jsd_beta) * kl_qm
    return div * (temperature * temperature)


def _project(h: Tensor, weight: Tensor, vocab_size: int) -> Tensor:
    w = weight[:vocab_size]
    dtype = torch.promote_types(h.dtype, w.dtype)
    return (h.to(dtype) @ w.to(dtype).T).float()


def _chunk_losses(
    student_h: Tensor, student_w: Tensor, teacher_h: Tensor, teacher_w: Tensor, targets: Tensor,
    vocab_size: int, kind: str, temperature: float, jsd_beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(divergence sum, cross-entropy sum, forward KL sum at temperature 1 (a detached metric)) of a chunk."""
    student_logits = _project(student_h, student_w, vocab_size)
    with torch.no_grad():
        teacher_logits = _project(teacher_h, teacher_w, vocab_size)
    div = token_divergence(student_logits, teacher_logits, kind=kind, temperature=temperature, jsd_beta=jsd_beta)
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    with torch.no_grad():
        if kind == "forward_kl" and temperature == 1.0:
            kl = div.detach().sum()
        else:
            kl = token_divergence(student_logits, teacher_logits, kind="forward_kl").sum()
    return div.sum(), ce, kl


@torch.compiler.disable
def chunked_distillation_loss(
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
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed divergence, summed cross-entropy, summed forward KL (metric) and the count of trained positions.

    `student_hidden` / `teacher_hidden` are `[..., D_s]` / `[..., D_t]` final hidden states of the same
    tokens (the dims may differ); `labels` `[...]` are the shifted targets, `ignore_index` where untrained.
    Only positions with a label are projected. The teacher side gets no gradient. The signature puts the
    student's two tensors first so it can be a model's `output_fn`.
    """
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)}, teacher hidden {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must agree on all but the last dim"
        )
    if not (0 < vocab_size <= student_weight.shape[0] and vocab_size <= teacher_weight.shape[0]):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, min(student rows {student_weight.shape[0]}, teacher rows "
            f"{teacher_weight.shape[0]})]"
        )
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = 4096), got {chunk_size}")
    chunk_size = chunk_size or 4096
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != ignore_index).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, positions)
    s_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    teacher_weight = teacher_weight.detach()
    use_checkpoint = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    zero = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    div_sum, ce_sum, kl_sum = zero, zero, zero
    for start in range(0, positions.numel(), chunk_size):
        pos = positions[start : start + chunk_size]
        args = (s_flat.index_select(0, pos), student_weight, t_flat.index_select(0, pos), teacher_weight,
                targets[start : start + chunk_size], vocab_size, kind, temperature, jsd_beta)
        if use_checkpoint:
            div, ce, kl = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            div, ce, kl = _chunk_losses(*args)
        div_sum, ce_sum, kl_sum = div_sum + div, ce_sum + ce, kl_sum + kl.detach()
    # a fill kernel, not torch.tensor(..., device=): that host-to-device copy waits for the whole loss (a sync)
    n_tokens = torch.full((), positions.numel(), dtype=torch.int64, device=labels.device)
    return div_sum, ce_sum, kl_sum, n_tokens
