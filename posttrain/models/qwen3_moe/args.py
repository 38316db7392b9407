"""Qwen3-MoE architecture arguments and named flavors (hyperparameters of the HF checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.models.qwen3.args import Qwen3Args


@dataclass
class Qwen3MoeArgs(Qwen3Args):
    """Qwen3 attention with routed experts in the MLP.

    ``ffn_dim`` is the dense MLP width of layers without experts (``mlp_only_layers``, or layers skipped by
    ``decoder_sparse_step``); ``moe_ffn_dim`` the width of each expert. ``router_aux_loss_coef`` weights the
    load-balancing loss the SFT loss adds (0 turns it off).
    """

    n_experts: int = 8
    n_experts_per_tok: int = 2
    moe_ffn_dim: int = 64
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(
                f"n_experts_per_tok ({self.n_experts_per_tok}) must be between 1 and n_experts ({self.n_experts})"
            )
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        self.mlp_only_layers = sorted(int(i) for i in self.mlp_only_layers)

    def is_moe_layer(self, layer_id: int) -> bool:
        """HF's rule: experts unless listed in mlp_only_layers, on every decoder_sparse_step-th layer."""
        return (
            layer_id not in self.mlp_only_layers
            and self.n_experts > 0
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )


_QWEN_TOKENS = dict(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, max_seq_len=40960)

QWEN3_MOE_FLAVORS: dict[str, Qwen3MoeArgs] = {
    "debug": Qwen3MoeArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=256,
        n_experts=8, n_experts_per_tok=2, moe_ffn_dim=64, max_seq_len=2048,
    ),
    "30B-A3B": Qwen3MoeArgs(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=6144,
                            n_experts=128, n_experts_per_tok=8, moe_ffn_dim=768, **_QWEN_TOKENS),
    "235B-A22B": Qwen3MoeArgs(dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128, ffn_dim=12288,
                              n_experts=128, n_experts_per_tok=8, moe_ffn_dim=1536, **_QWEN_TOKENS),
}
