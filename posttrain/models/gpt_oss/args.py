"""GPT-OSS architecture arguments and named flavors (hyperparameters of openai/gpt-oss-20b and -120b)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.models.common.transformer import TransformerArgs

SLIDING = "sliding_attention"
FULL = "full_attention"


def alternating_layer_types(n_layers: int) -> list[str]:
    """GPT-OSS: sliding-window and full attention alternate, sliding first."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]


def default_yarn() -> dict[str, Any]:
    return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 4096}


@dataclass
class GptOssArgs(TransformerArgs):
    """GPT-OSS: attention with biases and a learned sink logit per head, alternating sliding / full attention,
    YaRN RoPE, and in every layer a top-k MoE whose router and experts have biases and whose experts use the
    clamped SwiGLU ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha g)``, ``g = clamp(gate, max=l)``.

    ``ffn_dim`` is the width of each expert.
    """

    norm_eps: float = 1e-5
    rope_theta: float = 150_000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=default_yarn)
    qkv_bias: bool = True
    attn_out_bias: bool = True
    sliding_window: int = 128
    layer_types: list[str] | None = None
    n_experts: int = 8
    n_experts_per_tok: int = 2
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.0  # HF's default 0.9 is for its own (opt-in) router-logit loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = alternating_layer_types(self.n_layers)
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"layer_types may hold only {SLIDING!r} and {FULL!r}, got {bad}")
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(
                f"n_experts_per_tok ({self.n_experts_per_tok}) must be between 1 and n_experts ({self.n_experts})"
            )


_GPT_OSS = dict(
    dim=2880, n_heads=64, n_kv_heads=8, head_dim=64, ffn_dim=2880, vocab_size=201088, n_experts_per_tok=4,
    max_seq_len=131072, bos_token_id=199998, eos_token_id=200002, pad_token_id=199999,
)

GPT_OSS_FLAVORS: dict[str, GptOssArgs] = {
    "debug": GptOssArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=64,
        n_experts=8, n_experts_per_tok=2, sliding_window=16, max_seq_len=2048,
        rope_scaling={**default_yarn(), "original_max_position_embeddings": 64},  # factor 32 * 64 = max_seq_len
    ),
    "20b": GptOssArgs(n_layers=24, n_experts=32, **_GPT_OSS),
    "120b": GptOssArgs(n_layers=36, n_experts=128, **_GPT_OSS),
}
