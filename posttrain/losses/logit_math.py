"""The math of one chunk of logits for the fused head losses: loss terms and d loss / d logits in one pass.

Each function takes a `[c, V]` chunk of logits in the matmul dtype (bf16 in training) and works in fp32 (fp64
stays fp64). The `*_grad_` functions overwrite that chunk with the gradient of the loss with respect to it,
so the chunk's one buffer is the only `[c, V]` tensor a fused loss holds. On CUDA they run through
`torch.compile`, which fuses the reductions and the gradient into a couple of kernels that read the bf16
chunk and write it back (no fp32 `[c, V]` temporaries); elsewhere they run eagerly (same math, more memory).

Optional transforms of the raw logits z, in this order (HF's order: the model's cap, then the sampler's
temperature): logit soft-capping `cap * tanh(z / cap)` (Gemma 2/3's `final_logit_softcapping`), then `/ T`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger("posttrain")

__all__ = [
    "ce_grad_",
    "ce_rows",
    "chunk_math",
    "distill_grad_",
    "distill_rows",
    "log_prob_grad_",
    "log_prob_rows",
]


def _compute(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _transform(logits: Tensor, softcap: float | None, temperature: float) -> tuple[Tensor, Tensor | None]:
    """(transformed fp32 logits, d transformed / d raw without the 1/T factor; None when it is 1)."""
    z = _compute(logits)
    dcap = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
        dcap = 1.0 - t * t
    if temperature != 1.0:
        z = z / temperature
    return z, dcap


def _one_hot(z: Tensor, targets: Tensor) -> Tensor:
    return (torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]).to(z.dtype)


def ce_rows(logits: Tensor, targets: Tensor, softcap: float | None = None) -> Tensor:
    """Per-row cross-entropy `[c]` (no gradient)."""
    z, _ = _transform(logits, softcap, 1.0)
    return torch.logsumexp(z, dim=-1) - z.gather(1, targets[:, None]).squeeze(1)


def ce_grad_(logits: Tensor, targets: Tensor, softcap: float | None = None) -> Tensor:
    """Per-row cross-entropy `[c]`; `logits` is overwritten with d(sum of rows) / d logits."""
    z, dcap = _transform(logits, softcap, 1.0)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    rows = (lse - z.gather(1, targets[:, None])).squeeze(1)
    grad = torch.exp(z - lse) - _one_hot(z, targets)
    if dcap is not None:
        grad = grad * dcap
    logits.copy_(grad)
    return rows


def log_prob_rows(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, softcap: float | None = None, with_entropy: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log p(target) `[c]`, logsumexp `[c]` (kept for the backward), entropy `[c]` or None), all fp32."""
    z, _ = _transform(logits, softcap, temperature)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logp = (z.gather(1, targets[:, None]) - lse).squeeze(1)
    entropy = None
    if with_entropy:  # -sum p log p = lse - sum p z
        entropy = lse.squeeze(1) - (torch.exp(z - lse) * z).sum(-1)
    return logp, lse.squeeze(1), entropy


def log_prob_grad_(
    logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float = 1.0, softcap: float | None = None
) -> None:
    """`logits` is overwritten with d(sum_i grad_i * log p_i(target_i)) / d logits, given the rows' logsumexp."""
    z, dcap = _transform(logits, softcap, temperature)
    g = (_one_hot(z, targets) - torch.exp(z - lse[:, None])) * (grad.to(z.dtype)[:, None] / temperature)
    if dcap is not None:
        g = g * dcap
    logits.copy_(g)


def _distill_terms(
    student: Tensor, teacher: Tensor, targets: Tensor, kind: str, temperature: float, jsd_beta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(divergence rows, ce rows, forward-KL-at-T=1 rows, d ce / d z, d divergence / d z) of one chunk."""
    zs = _compute(student)
    zt = _compute(teacher).to(zs.dtype)
    log_q1 = torch.log_softmax(zs, dim=-1)
    log_p1 = torch.log_softmax(zt, dim=-1)
    ce = -log_q1.gather(1, targets[:, None]).squeeze(1)
    kl1 = (torch.exp(log_p1) * (log_p1 - log_q1)).sum(-1)
    grad_ce = torch.exp(log_q1) - _one_hot(zs, targets)
    if temperature == 1.0:
        log_q, log_p = log_q1, log_p1
    else:
        log_q = torch.log_softmax(zs / temperature, dim=-1)
        log_p = torch.log_softmax(zt / temperature, dim=-1)
    q = torch.exp(log_q)
    if kind == "forward_kl":
        p = torch.exp(log_p)
        div = (p * (log_p - log_q)).sum(-1)
        grad_s = q - p  # d div / d (z / T)
    else:
        if kind == "reverse_kl":
            r = log_q - log_p
            weight = 1.0
        else:  # jsd: M = beta P + (1 - beta) Q
            log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log(1 - jsd_beta))
            r = log_q - log_m
            weight = 1 - jsd_beta
        expect_r = (q * r).sum(-1, keepdim=True)
        if kind == "reverse_kl":
            div = expect_r.squeeze(1)
        else:
            div = jsd_beta * (torch.exp(log_p) * (log_p - log_m)).sum(-1) + (1 - jsd_beta) * expect_r.squeeze(1)
        grad_s = weight * q * (r - expect_r)
    # scaled by T^2 (Hinton et al.); d/dz = d/d(z/T) / T
    return div * temperature**2, ce, kl1, grad_ce, grad_s * temperature


def distill_rows(
    student: Tensor, teacher: Tensor, targets: Tensor, kind: str, temperature: float, jsd_beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(divergence rows, cross-entropy rows, forward-KL-at-temperature-1 rows), no gradient."""
    div, ce, kl1, _, _ = _distill_terms(student, teacher, targets, kind, temperature, jsd_beta)
    return div, ce, kl1


def distill_grad_(
    student: Tensor, teacher: Tensor, targets: Tensor, kind: str, temperature: float, jsd_beta: float,
    ce_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`distill_rows`, and `student` overwritten with d(sum of ce_weight * ce + (1 - ce_weight) * div) / d student."""
    div, ce, kl1, grad_ce, grad_div = _distill_terms(student, teacher, targets, kind, temperature, jsd_beta)
    student.copy_(ce_weight * grad_ce + (1 - ce_weight) * grad_div)
    return div, ce, kl1


# ------------------------------------------------------------------------------------------ compile

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()
compile_on_cuda = True  # tests and benchmarks may turn it off to compare with the eager math


def chunk_math(fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled for CUDA tensors (dynamic shapes: the last chunk is shorter); eager elsewhere or when
    compiling it failed once (logged)."""
    if device.type != "cuda" or not compile_on_cuda or fn in _failed:
        return fn
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = torch.compile(fn, dynamic=True)

    def run(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not stop training; eager is exact
            if fn in _failed:
                raise
            _failed.add(fn)
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly (more memory)",
                           fn.__name__, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return fn(*args, **kwargs)

    return run
