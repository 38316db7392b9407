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
    """The forward's own ops (the same numbers), its rstd kept for `rms_norm_backward`'s one-pass kernel.
    ``keep_residual``: x comes back too (an alias), so that the gradient of x's residual use reaches this backward
    and the kernel adds it in its pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, zero_centered: bool,  # type: ignore[override]
                keep_residual: bool) -> Tensor | tuple[Tensor, Tensor]:
        out, rstd = _normalized(x, weight, eps, zero_centered)
        ctx.save_for_backward(x, weight, rstd)
        ctx.zero_centered = zero_centered
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros to read
        return (out, x.view_as(x)) if keep_residual else out

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_residual: Tensor | None = None):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        if grad_out is None:
            return grad_residual, None, None, None, None
        dx, dweight = rms_norm_backward(grad_out, x, weight, rstd, ctx.zero_centered, grad_residual)
        return ((dx if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None),
                None, None, None)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    ``zero_centered=False`` (Llama, Qwen): ``weight * normalize(x.float()).to(x.dtype)``, weight initialised to 1.
    ``zero_centered=True`` (Gemma): ``(normalize(x.float()) * (1 + weight.float())).to(x.dtype)``, weight
    initialised to 0. The two cast orders differ on purpose: each matches its family's reference exactly.

    ``own_backward`` (set by the trainer from ``model.rms_norm_backward``): the same forward, and the backward as
    one pass over the rows (``rms_norm_backward``; a Triton kernel on CUDA) instead of autograd's / inductor's.
    Sharded (DTensor) inputs or weights keep autograd's. Blocks call ``with_residual`` where the norm's input is
    also the residual stream.
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
        if self._runs_own_backward(x):
            return _RMSNormOwnBackward.apply(x, self.weight, self.eps, self.zero_centered, False)
        return _normalized(x, self.weight, self.eps, self.zero_centered)[0]

    def with_residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(self(x), x)``, for a pre-norm block's ``normed, x = norm.with_residual(x); h = x + f(normed)``. With
        ``own_backward`` the x returned carries its residual gradient into the norm's one-pass backward (autograd
        would add the two gradients of x in a pass of its own; inductor fuses that add into its own norm backward)."""
        if self._runs_own_backward(x):
            return _RMSNormOwnBackward.apply(x, self.weight, self.eps, self.zero_centered, True)
        return self(x), x

    def _runs_own_backward(self, x: Tensor) -> bool:
        return self.own_backward and not isinstance(x, DTensor) and not isinstance(self.weight, DTensor)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, zero_centered={self.zero_centered}"


PER_HEAD_NORMS = ("q_norm", "k_norm")


def use_one_pass_backward(model: nn.Module) -> None:
    """``own_backward`` on every RMSNorm of ``model`` over the model width (``model.rms_norm_backward = "triton"``;
    before compile traces the blocks). The per-head q / k norms keep autograd's: inductor fuses their backward with
    RoPE's."""
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and name.rsplit(".", 1)[-1] not in PER_HEAD_NORMS:
            module.own_backward = True
