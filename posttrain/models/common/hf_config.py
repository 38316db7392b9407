"""HF ``config.json`` <-> ``TransformerArgs`` for dense decoders; families add their own checks and keys."""

from __future__ import annotations

from typing import Any, TypeVar

from posttrain.models.common.rope import rope_type_of
from posttrain.models.common.transformer import TransformerArgs

ArgsT = TypeVar("ArgsT", bound=TransformerArgs)


def rope_from_hf_config(config: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the legacy keys (``rope_theta`` + ``rope_scaling``, transformers
    4.x) or ``rope_parameters`` (transformers 5.x). rope_scaling is None for plain RoPE."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = config.get("rope_theta", default_theta)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if rope_type_of(params) == "default":
        extra = {k: v for k, v in params.items() if k != "rope_type"}
        if extra.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("partial_rotary_factor != 1 is not supported")
        return float(theta), None
    return float(theta), params


def require(config: dict[str, Any], key: str, expected: Any, default: Any) -> None:
    value = config.get(key, default)
    if value != expected:
        raise NotImplementedError(
            f"config.json has {key}={value!r}; posttrain supports only {key}={expected!r} for this family"
        )


def dense_args_from_hf_config(config: dict[str, Any], args_cls: type[ArgsT], **overrides: Any) -> ArgsT:
    require(config, "hidden_act", "silu", "silu")
    require(config, "mlp_bias", False, False)
    rope_theta, rope_scaling = rope_from_hf_config(config)
    n_heads = config["num_attention_heads"]
    fields: dict[str, Any] = dict(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=config.get("max_position_embeddings", 2048),
        qkv_bias=bool(config.get("attention_bias", False)),
        attn_out_bias=bool(config.get("attention_bias", False)),
        init_std=config.get("initializer_range", 0.02),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )
    fields.update(overrides)
    return args_cls(**fields)


def dense_hf_config_from_args(args: TransformerArgs, *, model_type: str, architecture: str) -> dict[str, Any]:
    """A config.json both transformers 4.x and 5.x read (legacy ``rope_theta`` / ``rope_scaling`` keys)."""
    if args.qkv_bias != args.attn_out_bias:
        raise ValueError(f"{model_type} has one attention_bias flag; qkv_bias and attn_out_bias must agree")
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
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
