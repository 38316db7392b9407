"""Fused per-token log-probs (and entropy) through the output projection, for DPO, reward and GRPO losses.

A loss built on per-token log-probs weighs each token by a factor known only after the forward (DPO's
sigmoid of the summed log-prob margin, GRPO's clipped ratio), so the logits' gradient cannot be made in
forward as the cross-entropy does. Forward projects a chunk at a time and keeps only the rows' logsumexp
(`[N]` fp32); backward projects each chunk again and turns it, in place, into
`grad_i * (onehot - softmax) / T`, multiplied straight into the hidden states' gradient and the weight's
gradient buffer (the weight's dtype). Per chunk one `[c, V]` buffer in the matmul dtype; no fp32 copy of
the head's gradient; the entropy comes from the same pass (no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.fused_head import (
    accumulate_grad_weight,
    chunk_rows,
    gathered,
    grad_weight_buffer,
    matmul_dtype,
    no_autocast,
)
from posttrain.losses.logit_math import chunk_math, log_prob_grad_, log_prob_rows

__all__ = ["fused_token_log_probs"]


class _FusedLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,  # [N, D]
        weight: Tensor,  # [Vp, D]
        targets: Tensor,  # [N]
        vocab_size: int,
        chunk_size: int,
        temperature: float,
        softcap: float | None,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        dtype = matmul_dtype(hidden, weight)
        rows = chunk_rows(chunk_size, vocab_size, torch.finfo(dtype).bits // 8)
        out_dtype = torch.promote_types(dtype, torch.float32)
        n = targets.numel()
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=out_dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=out_dtype, device=hidden.device)
        math = chunk_math(log_prob_rows, hidden.device)
        with no_autocast(hidden.device):
            w = weight[:vocab_size].to(dtype)
            for start in range(0, n, rows):
                end = min(start + rows, n)
                logits = hidden[start:end].to(dtype) @ w.T
                lp, ls, ent = math(logits, targets[start:end], temperature, softcap, with_entropy)
                logp[start:end], lse[start:end] = lp, ls
                if ent is not None:
                    entropy[start:end] = ent
                del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.settings = (vocab_size, rows, dtype, temperature, softcap)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        vocab_size, rows, dtype, temperature, softcap = ctx.settings
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        if grad_logp is None or not (need_hidden or need_weight):
            grad_weight = torch.zeros_like(weight) if need_weight else None
            return grad_hidden, grad_weight, None, None, None, None, None, None
        grad_weight = grad_weight_buffer(weight, vocab_size, targets.numel()) if need_weight else None
        math = chunk_math(log_prob_grad_, hidden.device)
        with no_autocast(hidden.device):
            w = weight[:vocab_size].to(dtype)
            for start in range(0, targets.numel(), rows):
                end = min(start + rows, targets.numel())
                h = hidden[start:end].to(dtype)
                logits = h @ w.T
                math(logits, targets[start:end], lse[start:end], grad_logp[start:end], temperature, softcap)
                if grad_hidden is not None:
                    grad_hidden[start:end] = logits @ w
                if grad_weight is not None:
                    accumulate_grad_weight(grad_weight[:vocab_size], logits, h, overwrite=start == 0)
                del logits
        return grad_hidden, grad_weight, None, None, None, None, None, None


@torch.compiler.disable
def fused_token_log_probs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    vocab_size: int,
    chunk_size: int = 0,
    ignore_index: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token `log softmax(softcap(hidden @ weight[:vocab_size].T) / temperature)[target]` in fp32, shaped
    like `target_ids`; with `entropy=True` also the per-token entropy of that distribution (no gradient).

    Same contract as `token_log_probs`: every position passed in is projected (select the ones you need
    first); positions equal to `ignore_index` (when given) return 0.0 and get no gradient. `chunk_size` 0
    sizes chunks to about 320 MiB of logits.
    """
    if hidden.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and target_ids {tuple(target_ids.shape)} must agree on all but the "
            "last dim"
        )
    weight = gathered(weight)
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, weight.shape[0]={weight.shape[0]}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    chunk_rows(chunk_size, vocab_size, 2)  # validates chunk_size
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = target_ids.reshape(-1)
    ignored = None
    if ignore_index is not None:
        ignored = flat_targets == ignore_index
        flat_targets = flat_targets.masked_fill(ignored, 0)
    logp, ent = _FusedLinearLogProbs.apply(
        flat_hidden, weight, flat_targets, vocab_size, chunk_size, float(temperature), softcap, entropy
    )
    if ignored is not None:
        logp = logp.masked_fill(ignored, 0.0)
        if entropy:
            ent = ent.masked_fill(ignored, 0.0)
    logp = logp.reshape(target_ids.shape)
    return (logp, ent.reshape(target_ids.shape)) if entropy else logp
