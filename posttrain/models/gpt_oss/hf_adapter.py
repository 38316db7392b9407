"""GPT-OSS <-> Hugging Face ``GptOssForCausalLM`` (bf16 checkpoints): state-dict names and config.json.

Only unquantized checkpoints load (``*_blocks`` / ``*_scales`` MXFP4 tensors do not: dequantize to bf16
first, e.g. transformers' ``Mxfp4Config(dequantize=True)`` + ``save_pretrained``).
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.models.common.hf_config import require, rope_from_hf_config
from .args import GptOssArgs, alternating_layer_types

HF_MODEL_TYPE = "gpt_oss"
HF_ARCHITECTURE = "GptOssForCausalLM"

# (ours, hf): full parameter names, "{}" = layer index
_PARAMS: list[tuple[str, str]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight"),
    ("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    ("layers.{}.attention.sinks", "model.layers.{}.self_attn.sinks"),
    ("layers.{}.feed_forward.router.weight", "model.layers.{}.mlp.router.weight"),
    ("layers.{}.feed_forward.router.bias", "model.layers.{}.mlp.router.bias"),
    *[
        (f"layers.{{}}.attention.{ours}.{leaf}", f"model.layers.{{}}.self_attn.{hf}.{leaf}")
        for ours, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
        for leaf in ("weight", "bias")
    ],
    *[
        (f"layers.{{}}.feed_forward.experts.{p}", f"model.layers.{{}}.mlp.experts.{p}")
        for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    ],
]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_TO_HF = [(_pattern(ours), hf) for ours, hf in _PARAMS]
_FROM_HF = [(_pattern(hf), ours) for ours, hf in _PARAMS]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            return target.replace("{}", match.group(1)) if match.groups() else target
    return None


def to_hf_name(name: str) -> str | None:
    return _rename(name, _TO_HF)


def from_hf_name(name: str) -> str | None:
    return _rename(name, _FROM_HF)


def args_from_hf_config(config: dict[str, Any]) -> GptOssArgs:
    if config.get("quantization_config"):
        raise NotImplementedError(
            "this GPT-OSS checkpoint is quantized (MXFP4); load a bf16 one (dequantize with transformers first)"
        )
    require(config, "attention_bias", True, True)
    theta, scaling = rope_from_hf_config(config, default_theta=150_000.0)
    n_layers = config["num_hidden_layers"]
    n_heads = config["num_attention_heads"]
    return GptOssArgs(
        dim=config["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=config.get("max_position_embeddings", 131072),
        sliding_window=config.get("sliding_window") or 128,
        layer_types=list(config.get("layer_types") or alternating_layer_types(n_layers)),
        n_experts=config["num_local_experts"] if "num_local_experts" in config else config["num_experts"],
        n_experts_per_tok=config.get("num_experts_per_tok", config.get("experts_per_token", 4)),
        swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(config.get("swiglu_limit", 7.0)),
        # like transformers: the router loss counts only when the config asks for router logits
        router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)) if config.get("output_router_logits")
        else 0.0,
        init_std=config.get("initializer_range", 0.02),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def hf_config_from_args(args: GptOssArgs) -> dict[str, Any]:
    if not (args.qkv_bias and args.attn_out_bias):
        raise ValueError("GPT-OSS has biases on q/k/v/o; qkv_bias and attn_out_bias must be True")
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "rope_parameters": {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta},
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types),
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.n_experts_per_tok,
        "experts_per_token": args.n_experts_per_tok,
        "swiglu_alpha": args.swiglu_alpha,
        "swiglu_limit": args.swiglu_limit,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "output_router_logits": args.router_aux_loss_coef > 0,
        "tie_word_embeddings": args.tie_embeddings,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "initializer_range": args.init_std,
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    return config
