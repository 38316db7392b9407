"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """``w2(silu(w1 x) * w3 x)``; w1 = gate, w3 = up, w2 = down (HF gate_proj / up_proj / down_proj)."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)
        for linear in (self.w1, self.w2, self.w3):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
