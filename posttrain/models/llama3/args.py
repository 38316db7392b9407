"""Llama 3 / 3.1 / 3.2 architecture arguments and named flavors (hyperparameters of the HF checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.models.common.transformer import TransformerArgs


def _llama3_rope_scaling(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@dataclass
class Llama3Args(TransformerArgs):
    """Llama 3: GQA, no q/k norm, no biases, "llama3" RoPE scaling."""

    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: _llama3_rope_scaling(8.0))


_LLAMA_TOKENS = dict(vocab_size=128256, bos_token_id=128000, eos_token_id=128001, max_seq_len=131072)

LLAMA3_FLAVORS: dict[str, Llama3Args] = {
    # tiny, for CPU tests and debug runs; the scaling's original context is shortened so that it bites
    "debug": Llama3Args(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=256,
        rope_scaling={**_llama3_rope_scaling(8.0), "original_max_position_embeddings": 256},
        max_seq_len=2048,
    ),
    "1B": Llama3Args(  # Llama 3.2 1B
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
        rope_scaling=_llama3_rope_scaling(32.0), tie_embeddings=True, **_LLAMA_TOKENS,
    ),
    "3B": Llama3Args(  # Llama 3.2 3B
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192,
        rope_scaling=_llama3_rope_scaling(32.0), tie_embeddings=True, **_LLAMA_TOKENS,
    ),
    "8B": Llama3Args(  # Llama 3.1 8B
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
        rope_scaling=_llama3_rope_scaling(8.0), **_LLAMA_TOKENS,
    ),
    "70B": Llama3Args(  # Llama 3.1 70B
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=28672,
        rope_scaling=_llama3_rope_scaling(8.0), **_LLAMA_TOKENS,
    ),
}
