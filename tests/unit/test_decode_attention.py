"""Decode attention against a KV cache (posttrain.models.common.decode_attention): the batched-matmul kernel and
the folded-GQA SDPA kernel equal plain SDPA over repeated k/v, on cache views, with per-row positions and a
sliding window; the native engine decodes with either and stays exact (greedy tokens, sampled log-probs); the
per-bucket choice by timing, and the attended-length buckets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.inference import SamplingParams
from posttrain.inference.decode_attention_choice import choose_decode_kernels
from posttrain.inference.native import NativeEngine, bucket_sizes, length_buckets
from posttrain.inference.slot_cache import SlotKVCache
from posttrain.models import build_model
from posttrain.models.common.attention import sliding_window_mask_mod
from posttrain.models.common.decode_attention import (
    MATMUL_MAX_QUERIES,
    decode_attention_kind,
    matmul_decode_attention,
    sdpa_decode_attention,
    use_decode_attention,
    uses_matmul,
)
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.greedy import greedy_generate
from test_inference_native_engine import VOCAB, random_prompts, recomputed_log_probs

CACHE_LEN, LENGTH = 40, 24  # attended: the first LENGTH positions of a longer cache (a view, as the engine's)


def cache_case(n_heads: int, n_kv: int, seq_len: int, window: int | None, dtype=torch.float32):
    """q [B, Hq, S, D]; k, v views [B, Hkv, LENGTH, D] of a [B, Hkv, CACHE_LEN, D] cache; the KV cache's mask
    for rows at different positions (one row at position 0, as a free slot of the engine)."""
    torch.manual_seed(0)
    batch, head_dim = 5, 16
    q = torch.randn(batch, n_heads, seq_len, head_dim, dtype=dtype)
    k_cache = torch.randn(batch, n_kv, CACHE_LEN, head_dim, dtype=dtype)
    v_cache = torch.randn(batch, n_kv, CACHE_LEN, head_dim, dtype=dtype)
    cache = KVCache(1, batch=batch, max_len=CACHE_LEN, n_kv_heads=n_kv, head_dim=head_dim, device="cpu", dtype=dtype)
    positions = torch.tensor([0, 3, 11, LENGTH - seq_len, 17])[:, None] + torch.arange(seq_len)
    cache.begin_forward(batch, seq_len, positions)
    cache._attend_len = LENGTH
    mask = cache.attention_mask(positions, None if window is None else sliding_window_mask_mod(window))
    return q, k_cache[:, :, :LENGTH], v_cache[:, :, :LENGTH], mask


def reference(q, k, v, mask, scale=None):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                          v.float().repeat_interleave(rep, 1), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("kernel", [matmul_decode_attention, sdpa_decode_attention], ids=["matmul", "sdpa"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2)], ids=["mha", "gqa2", "gqa3"])
@pytest.mark.parametrize("seq_len", [1, 2])
@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
def test_decode_kernels_equal_sdpa_over_repeated_heads(kernel, heads, seq_len: int, window) -> None:
    q, k, v, mask = cache_case(*heads, seq_len, window)
    for scale in (None, 0.3):
        torch.testing.assert_close(kernel(q, k, v, mask, scale), reference(q, k, v, mask, scale),
                                   rtol=1e-5, atol=1e-5)


def test_matmul_kernel_in_bf16_keeps_fp32_scores() -> None:
    q, k, v, mask = cache_case(4, 2, 1, None, dtype=torch.bfloat16)
    out = matmul_decode_attention(q, k, v, mask, None)
    assert out.dtype == torch.bfloat16
    want = reference(q, k, v, mask)
    # only P and the output are rounded to bf16: within a few bf16 ulps of the fp32 attention
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1e-2)


def test_kind_selection_and_its_context() -> None:
    one = torch.zeros(2, 4, 1, 8)
    assert decode_attention_kind() == "auto"
    assert not uses_matmul(one)  # auto: SDPA on the CPU (matmul on CUDA)
    with use_decode_attention("matmul"):
        assert uses_matmul(one)
        assert not uses_matmul(torch.zeros(2, 4, MATMUL_MAX_QUERIES + 1, 8))  # a long chunk: SDPA
        with use_decode_attention("sdpa"):
            assert not uses_matmul(one)
        assert decode_attention_kind() == "matmul"
    assert decode_attention_kind() == "auto"
    with pytest.raises(ValueError, match="unknown decode_attention 'flash'"):
        NativeEngine(build_model("llama3", "debug", device="cpu", vocab_size=VOCAB), decode_attention="flash")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_engine_with_matmul_decode_is_exact(family: str) -> None:
    """Greedy tokens equal the cache-free reference decoder's and the SDPA-decode engine's; sampled log-probs
    equal the trainer's recomputation (gemma3: sliding-window and global layers)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(family, "debug", device="cpu", vocab_size=VOCAB, init_std=0.1).eval()
    prompts = random_prompts()
    engines = {kind: NativeEngine(model, max_batch_size=4, steps_per_check=3, decode_attention=kind)
               for kind in ("matmul", "sdpa")}
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    want = [greedy_generate(model, p, 20) for p in prompts]
    for engine in engines.values():
        assert [c.token_ids for c in engine.generate(prompts, greedy)] == want
    sampling = SamplingParams(max_new_tokens=20, temperature=0.8, seed=2)
    sampled = engines["matmul"].generate(prompts, sampling)
    for completion, prompt in zip(sampled, prompts):
        torch.testing.assert_close(torch.tensor(completion.log_probs),
                                   recomputed_log_probs(model, prompt, completion.token_ids, 0.8),
                                   atol=1e-4, rtol=0)
    assert decode_attention_kind() == "auto"  # the engine's choice does not leak out of its calls


def test_choose_decode_kernels_times_both_on_the_cache_or_keeps_a_forced_kind() -> None:
    cache = SlotKVCache(2, batch=4, max_len=32, n_kv_heads=2, head_dim=16, device="cpu", dtype=torch.float32)
    shapes = [(2, 16), (4, 32)]
    kinds, seconds = {}, {}
    choose_decode_kernels(kinds, seconds, cache, 4, shapes, "auto")
    assert set(kinds) == set(shapes) and set(kinds.values()) <= {"matmul", "sdpa"}
    for shape in shapes:
        assert set(seconds[shape]) == {"matmul", "sdpa"} and min(seconds[shape].values()) > 0
        assert kinds[shape] == min(seconds[shape], key=seconds[shape].get)
    forced: dict = {(2, 16): "matmul"}
    choose_decode_kernels(forced, {}, cache, 4, shapes, "sdpa")
    assert forced == {(2, 16): "matmul", (4, 32): "sdpa"}  # a chosen shape keeps its kernel


def test_length_buckets_grow_by_at_most_one_and_a_half_past_the_second() -> None:
    assert length_buckets(640, 128) == [128, 256, 384, 512, 640]
    assert length_buckets(4096, 128) == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert length_buckets(100, 128) == [100]
    assert bucket_sizes(512, 4) == [4, 8, 16, 32, 64, 128, 256, 512]
