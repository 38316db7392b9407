"""Qwen3 (dense): the shared decoder with per-head q/k RMSNorm."""

from __future__ import annotations

from posttrain.models.common.transformer import Transformer
from .args import Qwen3Args


class Qwen3Model(Transformer):
    def __init__(self, args: Qwen3Args) -> None:
        if not args.qk_norm:
            raise ValueError("Qwen3 always has q/k norm; set qk_norm=True")
        super().__init__(args)
