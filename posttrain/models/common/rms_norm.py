"""RMSNorm with the numerics of Hugging Face's implementations (statistics in fp32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from posttrain.models.common.rms_norm_backward import rms_norm_backward


def _normalized(x: Tensor, weight: Tensor, eps: float, zero_centered: bool) -> tuple[Tensor, Tensor]:
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * rstd
    if zero_centered:
        return (h * (1.0 + weight.float())).to(x.dtype), rstd
    return weight * h.to(x.dtype), rstd


class _RMSNormOwnBackward(torch.autograd.Function):
    """The forward's own ops (the same numbers), its rstd kept for `rms_norm_backward`'s one-pass kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, zero_centered: bool) -> Tensor:  # type: ignore[override]
        out, rstd = _normalized(x, weight, eps, zero_centered)
        ctx.save_for_backward(x, weight, rstd)
        ctx.zero_centered = zero_centered
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(grad_out, x, weight, rstd, ctx.zero_centered)
        return (dx if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None), None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    ``zero_centered=False`` (Llama, Qwen): ``weight * normalize(x.float()).to(x.dtype)``, weight initialised to 1.
    ``zero_centered=True`` (Gemma): ``(normalize(x.float()) * (1 + weight.float())).to(x.dtype)``, weight
    initialised to 0. The two cast orders differ on purpose: each matches its family's reference exactly.

    ``own_backward`` (set by the trainer from ``model.rms_norm_backward``): the same forward, and the backward as
    one pass over the rows (``rms_norm_backward``; a Triton kernel on CUDA) instead of autograd's / inductor's.
    Sharded (DTensor) inputs or weights keep autograd's.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, zero_centered: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.zero_centered = zero_centered
        self.own_backward = False
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.zero_centered:
                self.weight.zero_()
            else:
                self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.own_backward and not isinstance(x, DTensor) and not isinstance(self.weight, DTensor):
            return _RMSNormOwnBackward.apply(x, self.weight, self.eps, self.zero_centered)
        return _normalized(x, self.weight, self.eps, self.zero_centered)[0]

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, zero_centered={self.zero_centered}"
