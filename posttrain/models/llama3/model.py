"""Llama 3: the shared decoder, configured by ``Llama3Args`` (no q/k norm, "llama3" RoPE scaling)."""

from __future__ import annotations

from posttrain.models.common.transformer import Transformer
from .args import Llama3Args


class Llama3Model(Transformer):
    def __init__(self, args: Llama3Args) -> None:
        if args.qk_norm:
            raise ValueError("Llama 3 has no q/k norm; set qk_norm=False")
        super().__init__(args)
