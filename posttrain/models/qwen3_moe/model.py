"""Qwen3-MoE: the Qwen3 decoder with a routed-experts MLP (``posttrain.models.common.moe.MoE``) in its sparse
layers. Module names: ``layers.i.feed_forward`` is the MoE (``.router``, ``.experts.{w1,w2,w3}``) or, in
dense layers, the usual SwiGLU ``FeedForward``."""

from __future__ import annotations

import torch

from posttrain.models.common.moe import MoE, expert_load_imbalance
from posttrain.models.common.transformer import Transformer
from posttrain.models.qwen3_moe.args import Qwen3MoeArgs


class Qwen3MoeModel(Transformer):
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

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """``router_aux_loss_coef`` * the mean over MoE layers of their load-balancing loss in the last
        forward (differentiable); None when the coefficient is 0 or nothing was routed yet."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if not losses or self.args.router_aux_loss_coef == 0:
            return None
        return self.args.router_aux_loss_coef * torch.stack(losses).mean()

    @torch.no_grad()
    def moe_metrics(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the last forward: the raw load-balancing loss (mean over layers) and the
        load imbalance (max / mean tokens per expert, mean over layers; 1 = balanced)."""
        layers = [m for m in self.moe_layers() if m.tokens_per_expert is not None]
        if not layers:
            return {}
        return {
            "moe_aux_loss": torch.stack([m.aux_loss.detach().float() for m in layers]).mean(),
            "moe_load_imbalance": torch.stack([expert_load_imbalance(m.tokens_per_expert) for m in layers]).mean(),
        }

    def tokens_per_expert(self) -> dict[str, torch.Tensor]:
        """Routed (token, slot) counts per expert of the last forward, by layer name."""
        return {
            name: m.tokens_per_expert
            for name, m in self.named_modules()
            if isinstance(m, MoE) and m.tokens_per_expert is not None
        }

    def param_active_fraction(self, name: str) -> float:
        """The share of parameter ``name`` one token computes with: top_k / n_experts for expert weights,
        1 otherwise. The trainer's MFU uses it to count active parameters only."""
        if ".experts." in f".{name}":
            return self.args.n_experts_per_tok / self.args.n_experts
        return 1.0

    def active_params_per_token(self) -> int:
        """Parameters one token computes with: attention, router, top_k experts per MoE layer, the output head
        (not an untied input embedding: a lookup is no matmul). What MFU counts; gpt-oss-120b: 5.13B."""
        return sum(
            int(p.shape.numel() * self.param_active_fraction(n))
            for n, p in self.named_parameters()
            if self.args.tie_embeddings or not n.startswith("tok_embeddings.")
        )
