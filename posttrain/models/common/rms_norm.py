"""RMSNorm with the numerics of Hugging Face's implementations (statistics in fp32)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    ``zero_centered=False`` (Llama, Qwen): ``weight * normalize(x.float()).to(x.dtype)``, weight initialised to 1.
    ``zero_centered=True`` (Gemma): ``(normalize(x.float()) * (1 + weight.float())).to(x.dtype)``, weight
    initialised to 0. The two cast orders differ on purpose: each matches its family's reference exactly.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, zero_centered: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.zero_centered:
                self.weight.zero_()
            else:
                self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (h * (1.0 + self.weight.float())).to(input_dtype)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, zero_centered={self.zero_centered}"
