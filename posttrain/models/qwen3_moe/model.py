"""Qwen3-MoE: the Qwen3 decoder with a routed-experts MLP (``posttrain.models.common.moe.MoE``) in its sparse
layers. Module names: ``layers.i.feed_forward`` is the MoE (``.router``, ``.experts.{w1,w2,w3}``) or, in
dense layers, the usual SwiGLU ``FeedForward``."""

from __future__ import annotations

import torch

from posttrain.models.common.moe import MoE, MoEModelHooks
from posttrain.models.common.transformer import Transformer
from .args import Qwen3MoeArgs


class Qwen3MoeModel(MoEModelHooks, Transformer):
    moe_layer_type = MoE

    def __init__(self, args: Qwen3MoeArgs) -> None:
        if not args.qk_norm:
            raise ValueError("Qwen3-MoE always has q/k norm; set qk_norm=True")
        super().__init__(args)
        for i, block in self.layers.items():
            if args.is_moe_layer(int(i)):
                block.feed_forward = MoE(
                    args.dim, args.moe_ffn_dim, args.n_experts, args.n_experts_per_tok,
                    norm_topk_prob=args.norm_topk_prob,
                )
