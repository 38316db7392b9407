"""Qwen3 (dense) architecture arguments and named flavors (hyperparameters of the HF checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.models.common.transformer import TransformerArgs


@dataclass
class Qwen3Args(TransformerArgs):
    """Qwen3: GQA, per-head RMSNorm on q and k before RoPE, head_dim 128 whatever dim / n_heads is."""

    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    qk_norm: bool = True


_QWEN_TOKENS = dict(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, max_seq_len=40960)

QWEN3_FLAVORS: dict[str, Qwen3Args] = {
    "debug": Qwen3Args(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=256,
        tie_embeddings=True, max_seq_len=2048,
    ),
    "0.6B": Qwen3Args(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=3072,
                      tie_embeddings=True, **_QWEN_TOKENS),
    "1.7B": Qwen3Args(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=6144,
                      tie_embeddings=True, **_QWEN_TOKENS),
    "4B": Qwen3Args(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=9728,
                    tie_embeddings=True, **_QWEN_TOKENS),
    "8B": Qwen3Args(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=12288,
                    **_QWEN_TOKENS),
    "14B": Qwen3Args(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, head_dim=128, ffn_dim=17408,
                     **_QWEN_TOKENS),
    "32B": Qwen3Args(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128, ffn_dim=25600,
                     **_QWEN_TOKENS),
}
