"""Gemma 3 (text) architecture arguments and named flavors (hyperparameters of the HF checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.models.common.transformer import TransformerArgs

SLIDING = "sliding_attention"
FULL = "full_attention"


def default_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's pattern: five sliding-window layers, then one global layer, repeated."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]


@dataclass
class Gemma3Args(TransformerArgs):
    """Gemma 3: scaled embeddings, (1 + w) RMSNorms, sandwich norms around attention and MLP, q/k norms,
    GELU(tanh) MLP, sliding-window layers (RoPE base ``local_rope_theta``) interleaved with global layers
    (``rope_theta`` + ``rope_scaling``), softmax scale ``query_pre_attn_scalar ** -0.5``, tied embeddings.

    ``layer_types`` uses HF's names ("sliding_attention" / "full_attention"); None: the 5:1 pattern.
    """

    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    local_rope_theta: float = 10_000.0
    sliding_window: int = 512
    layer_types: list[str] | None = field(default=None)
    query_pre_attn_scalar: float = 256.0
    qk_norm: bool = True
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.n_layers)
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"layer_types may hold only {SLIDING!r} and {FULL!r}, got {bad}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")


_GEMMA_TOKENS = dict(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0)
_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}

GEMMA3_FLAVORS: dict[str, Gemma3Args] = {
    "debug": Gemma3Args(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=256,
        sliding_window=16, layer_types=[SLIDING, SLIDING, SLIDING, FULL], query_pre_attn_scalar=32,
        max_seq_len=2048,
    ),
    "1B": Gemma3Args(dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=6912,
                     vocab_size=262144, sliding_window=512, query_pre_attn_scalar=256, max_seq_len=32768,
                     **_GEMMA_TOKENS),
    "4B": Gemma3Args(dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=10240,
                     vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256, max_seq_len=131072,
                     rope_scaling=_LINEAR_8, **_GEMMA_TOKENS),
    "12B": Gemma3Args(dim=3840, n_layers=48, n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=15360,
                      vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256, max_seq_len=131072,
                      rope_scaling=_LINEAR_8, **_GEMMA_TOKENS),
    "27B": Gemma3Args(dim=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=21504,
                      vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=168, max_seq_len=131072,
                      rope_scaling=_LINEAR_8, **_GEMMA_TOKENS),
}
