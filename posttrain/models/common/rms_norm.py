"""RMSNorm with the numerics of Hugging Face's implementations (statistics in fp32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from posttrain.models.common.rms_norm_backward import rms_norm_backward, rms_norm_backward_gemv


def _normalized(x: Tensor, weight: Tensor, eps: float, zero_centered: bool) -> tuple[Tensor, Tensor]:
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * rstd
    if zero_centered:
        return (h * (1.0 + weight.float())).to(x.dtype), rstd
    return weight * h.to(x.dtype), rstd


class _RMSNormOwnBackward(torch.autograd.Function):
    """The forward's own ops (the same numbers), its rstd kept for the backward: `rms_norm_backward`'s one-pass
    kernel (``impl = "triton"``) or `rms_norm_backward_gemv` (``"gemv"``). ``keep_residual``: x comes back too (an
    alias), so that the gradient of x's residual use reaches this backward and is added in its pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, zero_centered: bool,  # type: ignore[override]
                keep_residual: bool, impl: str) -> Tensor | tuple[Tensor, Tensor]:
        out, rstd = _normalized(x, weight, eps, zero_centered)
        ctx.save_for_backward(x, weight, rstd)
        ctx.zero_centered = zero_centered
        ctx.impl = impl
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros to read
        return (out, x.view_as(x)) if keep_residual else out

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_residual: Tensor | None = None):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        if grad_out is None:
            return grad_residual, None, None, None, None, None
        backward = rms_norm_backward_gemv if ctx.impl == "gemv" else rms_norm_backward
        dx, dweight = backward(grad_out, x, weight, rstd, ctx.zero_centered, grad_residual)
        return ((dx if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None),
                None, None, None, None)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    ``zero_centered=False`` (Llama, Qwen): ``weight * normalize(x.float()).to(x.dtype)``, weight initialised to 1.
    ``zero_centered=True`` (Gemma): ``(normalize(x.float()) * (1 + weight.float())).to(x.dtype)``, weight
    initialised to 0. The two cast orders differ on purpose: each matches its family's reference exactly.

    ``backward_impl`` (set by the trainer from ``model.rms_norm_backward``): ``"autograd"``, or
    the same forward with the backward as one pass over the rows (``"triton"``: ``rms_norm_backward``, a Triton
    kernel on CUDA) or in torch ops with the weight's gradient as a matrix-vector product (``"gemv"``: for inductor
    to compile). Sharded (DTensor) inputs or weights keep autograd's. Blocks call ``with_residual`` where the norm's
    input is also the residual stream.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, zero_centered: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.zero_centered = zero_centered
        self.backward_impl = "autograd"
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
            return _RMSNormOwnBackward.apply(x, self.weight, self.eps, self.zero_centered, False, self.backward_impl)
        return _normalized(x, self.weight, self.eps, self.zero_centered)[0]

    def with_residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(self(x), x)``, for a pre-norm block's ``normed, x = norm.with_residual(x); h = x + f(normed)``. With
        a ``backward_impl`` of its own the x returned carries its residual gradient into the norm's backward (autograd
        would add the two gradients of x in a pass of its own; inductor fuses that add into its own norm backward)."""
        if self._runs_own_backward(x):
            return _RMSNormOwnBackward.apply(x, self.weight, self.eps, self.zero_centered, True, self.backward_impl)
        return self(x), x

    def _runs_own_backward(self, x: Tensor) -> bool:
        return (self.backward_impl != "autograd" and not isinstance(x, DTensor)
                and not isinstance(self.weight, DTensor))

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, zero_centered={self.zero_centered}"
