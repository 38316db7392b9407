"""Qwen3-MoE <-> Hugging Face ``Qwen3MoeForCausalLM``: state-dict names and config.json.

Checkpoints hold one tensor per expert (``mlp.experts.{e}.gate_proj.weight``); posttrain holds them stacked
(``feed_forward.experts.w1`` [E, moe_ffn_dim, dim]). The expert names map through an ``{e}`` template /
``[row]`` suffix (``posttrain.models.common.stacked_names``); everything else is the dense Qwen3 map plus the
router (``mlp.gate`` <-> ``feed_forward.router``).
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.models.common.hf_config import dense_args_from_hf_config, dense_hf_config_from_args
from posttrain.models.common.hf_names import DENSE_DECODER_MODULES, StateDictNameMap
from .args import Qwen3MoeArgs

HF_MODEL_TYPE = "qwen3_moe"
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"

NAME_MAP = StateDictNameMap([*DENSE_DECODER_MODULES, ("layers.{}.feed_forward.router", "model.layers.{}.mlp.gate")])
# ours: layers.{L}.feed_forward.experts.{w1,w2,w3}  <->  model.layers.{L}.mlp.experts.{e}.{gate,down,up}_proj.weight
_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_OUR_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w[123])$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")


def to_hf_name(name: str) -> str | None:
    match = _OUR_EXPERT.match(name)
    if match:
        layer, w = match.groups()
        return f"model.layers.{layer}.mlp.experts.{{e}}.{_EXPERT_PROJ[w]}.weight"
    return NAME_MAP.to_hf(name)


def from_hf_name(name: str) -> str | None:
    match = _HF_EXPERT.match(name)
    if match:
        layer, expert, proj = match.groups()
        w = next(k for k, v in _EXPERT_PROJ.items() if v == proj)
        return f"layers.{layer}.feed_forward.experts.{w}[{expert}]"
    return NAME_MAP.from_hf(name)


def args_from_hf_config(config: dict[str, Any]) -> Qwen3MoeArgs:
    if config.get("use_sliding_window", False):
        raise NotImplementedError("Qwen3-MoE with use_sliding_window=true is not supported")
    return dense_args_from_hf_config(
        config,
        Qwen3MoeArgs,
        qk_norm=True,
        n_experts=config["num_experts"] if "num_experts" in config else config["num_local_experts"],
        n_experts_per_tok=config["num_experts_per_tok"],
        moe_ffn_dim=config["moe_intermediate_size"],
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
        decoder_sparse_step=config.get("decoder_sparse_step", 1),
        mlp_only_layers=list(config.get("mlp_only_layers") or []),
    )


def hf_config_from_args(args: Qwen3MoeArgs) -> dict[str, Any]:
    config = dense_hf_config_from_args(args, model_type=HF_MODEL_TYPE, architecture=HF_ARCHITECTURE)
    config.update(
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=args.n_layers,
        num_experts=args.n_experts,  # transformers 4.x and Hub checkpoints
        num_local_experts=args.n_experts,  # what transformers >= 5.2x writes (num_experts is its alias)
        num_experts_per_tok=args.n_experts_per_tok,
        moe_intermediate_size=args.moe_ffn_dim,
        norm_topk_prob=args.norm_topk_prob,
        router_aux_loss_coef=args.router_aux_loss_coef,
        decoder_sparse_step=args.decoder_sparse_step,
        mlp_only_layers=list(args.mlp_only_layers),
        output_router_logits=False,
    )
    return config
