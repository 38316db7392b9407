"""Gemma 3 (text) <-> Hugging Face ``Gemma3ForCausalLM`` (model_type "gemma3_text"): names and config.json."""

from __future__ import annotations

from typing import Any

from posttrain.models.common.hf_config import require, rope_from_hf_config
from posttrain.models.common.hf_names import StateDictNameMap
from .args import FULL, SLIDING, Gemma3Args, default_layer_types

HF_MODEL_TYPE = "gemma3_text"
HF_ARCHITECTURE = "Gemma3ForCausalLM"

NAME_MAP = StateDictNameMap([
    ("tok_embeddings", "model.embed_tokens"),
    ("layers.{}.attention_norm", "model.layers.{}.input_layernorm"),
    ("layers.{}.attention.wq", "model.layers.{}.self_attn.q_proj"),
    ("layers.{}.attention.wk", "model.layers.{}.self_attn.k_proj"),
    ("layers.{}.attention.wv", "model.layers.{}.self_attn.v_proj"),
    ("layers.{}.attention.wo", "model.layers.{}.self_attn.o_proj"),
    ("layers.{}.attention.q_norm", "model.layers.{}.self_attn.q_norm"),
    ("layers.{}.attention.k_norm", "model.layers.{}.self_attn.k_norm"),
    ("layers.{}.post_attention_norm", "model.layers.{}.post_attention_layernorm"),
    ("layers.{}.ffn_norm", "model.layers.{}.pre_feedforward_layernorm"),
    ("layers.{}.post_ffn_norm", "model.layers.{}.post_feedforward_layernorm"),
    ("layers.{}.feed_forward.w1", "model.layers.{}.mlp.gate_proj"),
    ("layers.{}.feed_forward.w2", "model.layers.{}.mlp.down_proj"),
    ("layers.{}.feed_forward.w3", "model.layers.{}.mlp.up_proj"),
    ("norm", "model.norm"),
    ("output", "lm_head"),
])


def to_hf_name(name: str) -> str | None:
    return NAME_MAP.to_hf(name)


def from_hf_name(name: str) -> str | None:
    return NAME_MAP.from_hf(name)


def _rope_per_layer_type(config: dict[str, Any]) -> tuple[float, dict | None, float]:
    """(global theta, global rope_scaling, local theta) from transformers 5.x ``rope_parameters`` keyed by layer
    type, or 4.x ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        theta, scaling = rope_from_hf_config({"rope_parameters": params[FULL]}, default_theta=1_000_000.0)
        local_theta, local_scaling = rope_from_hf_config(
            {"rope_parameters": params.get(SLIDING) or {}}, default_theta=10_000.0
        )
        if local_scaling is not None:
            raise NotImplementedError(f"RoPE scaling on sliding layers is not supported: {local_scaling}")
        return theta, scaling, local_theta
    theta, scaling = rope_from_hf_config(config, default_theta=1_000_000.0)
    return theta, scaling, float(config.get("rope_local_base_freq", 10_000.0))


def args_from_hf_config(config: dict[str, Any]) -> Gemma3Args:
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise NotImplementedError(f"config.json has hidden_activation={act!r}; Gemma 3 uses 'gelu_pytorch_tanh'")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:  # Gemma 3 checkpoints set both to null (Gemma 2 used them)
            raise NotImplementedError(f"config.json sets {key}={config[key]}; logit softcapping is not supported")
    require(config, "use_bidirectional_attention", False, False)
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or default_layer_types(n_layers, config.get("sliding_window_pattern", 6))
    theta, scaling, local_theta = _rope_per_layer_type(config)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    return Gemma3Args(
        dim=config["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_theta=local_theta,
        sliding_window=config.get("sliding_window") or 4096,
        layer_types=list(layer_types),
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", head_dim),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        max_seq_len=config.get("max_position_embeddings", 131072),
        qkv_bias=bool(config.get("attention_bias", False)),
        attn_out_bias=bool(config.get("attention_bias", False)),
        init_std=config.get("initializer_range", 0.02),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def hf_config_from_args(args: Gemma3Args) -> dict[str, Any]:
    """config.json for transformers 5.x (``rope_parameters`` per layer type) that 4.x also reads (legacy keys)."""
    if args.qkv_bias != args.attn_out_bias:
        raise ValueError("gemma3 has one attention_bias flag; qkv_bias and attn_out_bias must agree")
    full = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta}
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
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {
            FULL: full,
            SLIDING: {"rope_type": "default", "rope_theta": args.local_rope_theta},
        },
        "rope_theta": args.rope_theta,
        "rope_local_base_freq": args.local_rope_theta,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types),
        "query_pre_attn_scalar": args.query_pre_attn_scalar,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": args.tie_embeddings,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": args.qkv_bias,
        "attention_dropout": 0.0,
        "initializer_range": args.init_std,
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    return config
