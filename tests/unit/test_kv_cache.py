"""KV-cache forwards (posttrain.models.common.kv_cache) equal the cache-free forward: a prefill from slot 0,
then tokens appended at per-row positions (several at once, or one per step), on every family."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import build_model
from posttrain.models.common.kv_cache import KVCache

FAMILIES = ["llama3", "qwen3", "gemma3", "qwen3_moe", "gpt_oss"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small decode fastest on one thread (and do not stall when the CPU is oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_appends_match_the_full_forward(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, "debug", device="cpu", vocab_size=500, init_std=0.1).eval()
    ids = torch.randint(0, 500, (2, 40))  # longer than the 16-token sliding window of gemma3 / gpt_oss
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2, max_len=48)
        prefill = model(ids[:, :12], kv_cache=cache)
        torch.testing.assert_close(prefill, model(ids[:, :12]), atol=0, rtol=0)  # the training forward itself
        chunk = model(ids[:, 12:30], position_ids=torch.arange(12, 30).expand(2, -1), kv_cache=cache)
        steps = [
            model(ids[:, p : p + 1], position_ids=torch.full((2, 1), p), kv_cache=cache) for p in range(30, 40)
        ]
    torch.testing.assert_close(chunk, full[:, 12:30], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 30:], atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_and_dropping_rows() -> None:
    """Right-padded prompts of different lengths: each row appends at its own position; select_rows keeps a
    subset of the rows."""
    torch.manual_seed(0)
    model = build_model("gemma3", "debug", device="cpu", vocab_size=500, init_std=0.1).eval()
    a, b = torch.randint(0, 500, (1, 30)), torch.randint(0, 500, (1, 30))
    lengths = (9, 21)
    padded = torch.zeros(2, 21, dtype=torch.long)
    padded[0, :9], padded[1, :21] = a[0, :9], b[0, :21]
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = KVCache.for_model(model, batch=2, max_len=30)
        model(padded, kv_cache=cache)
        for step in range(9):  # row 0 fills positions 9..17 while row 1 goes on at 21..29
            pos = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
            ids = torch.stack([a[0, pos[0, 0]], b[0, pos[1, 0]]])[:, None]
            out = model(ids, position_ids=pos, kv_cache=cache)
            torch.testing.assert_close(out[0, 0], full_a[0, pos[0, 0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[1, 0], full_b[0, pos[1, 0]], atol=1e-5, rtol=1e-5)
        cache.select_rows(torch.tensor([0]))
        out = model(a[:, 18:19], position_ids=torch.tensor([[18]]), kv_cache=cache)
    torch.testing.assert_close(out[0, 0], full_a[0, 18], atol=1e-5, rtol=1e-5)


def test_positions_past_the_cache_are_an_error() -> None:
    model = build_model("llama3", "debug", device="cpu").eval()
    cache = KVCache.for_model(model, batch=1, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 1, dtype=torch.long), position_ids=torch.tensor([[8]]), kv_cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="rows"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
