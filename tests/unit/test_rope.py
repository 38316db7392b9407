"""RoPE matches transformers: inverse frequencies (default and llama3 scaling) and cos/sin per position."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.common.rope import RotaryEmbedding, apply_rotary_emb, compute_inv_freq

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_llama_config(head_dim: int, theta: float, scaling: dict | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, num_hidden_layers=1,
        intermediate_size=64, vocab_size=64, max_position_embeddings=131072, rope_theta=theta,
        rope_scaling=dict(scaling) if scaling else None,
    )


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_inv_freq_matches_transformers(head_dim: int, factor: float) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {**LLAMA3_SCALING, "factor": factor}
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["llama3"](_hf_llama_config(head_dim, 500000.0, scaling), "cpu")
    inv_freq, scale = compute_inv_freq(head_dim, 500000.0, scaling)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=0, atol=0)
    assert scale == hf_scale
    plain, _ = compute_inv_freq(head_dim, 500000.0, None)
    assert not torch.equal(inv_freq, plain)  # the scaling changed the low frequencies


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_cos_sin_match_transformers_for_restarting_positions(scaling: dict | None) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    position_ids = torch.cat([torch.arange(5), torch.arange(9000, 9011), torch.arange(3)]).unsqueeze(0)
    hf_cos, hf_sin = LlamaRotaryEmbedding(_hf_llama_config(64, 500000.0, scaling))(
        torch.zeros(1, dtype=torch.float32), position_ids
    )
    cos, sin = RotaryEmbedding(64, 500000.0, scaling)(position_ids, dtype=torch.float32)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=0)


def test_rotation_depends_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, 10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        cos, sin = rope(torch.tensor([[q_pos]]), dtype=torch.float32)
        q_rot, _ = apply_rotary_emb(q, q, cos, sin)
        cos, sin = rope(torch.tensor([[k_pos]]), dtype=torch.float32)
        _, k_rot = apply_rotary_emb(k, k, cos, sin)
        return (q_rot * k_rot).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-5, atol=1e-5)


def test_unknown_rope_type_is_a_clear_error() -> None:
    with pytest.raises(NotImplementedError, match="rope_type 'dynamic'"):
        compute_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


def test_init_buffers_restores_inv_freq_after_meta_build() -> None:
    with torch.device("meta"):
        rope = RotaryEmbedding(64, 500000.0, LLAMA3_SCALING)
    assert rope.inv_freq.is_meta
    rope.to_empty(device="cpu")
    rope.init_buffers("cpu")
    torch.testing.assert_close(rope.inv_freq, compute_inv_freq(64, 500000.0, LLAMA3_SCALING)[0], rtol=0, atol=0)
