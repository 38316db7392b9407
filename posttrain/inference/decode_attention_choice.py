"""Which decode attention kernel a captured decode step uses, chosen by timing both on the step's shape.

The batched-matmul kernel reads the cache once but runs five kernels; SDPA's masked kernel runs one but
pads the 1-2 query rows of a KV head to a tile of 32-64. Which is faster depends on the batch, the attended
length, the head sizes and the GPU, so ``fastest_decode_attention`` times each on the real cache (one layer's
keys and values, rows at spread positions) and the engine captures each (slots, length) bucket's graph with
the winner. A few milliseconds per bucket, once per cache shape.
"""

from __future__ import annotations

import time

import torch

from posttrain.models.common.decode_attention import matmul_decode_attention, sdpa_decode_attention
from posttrain.models.common.kv_cache import KVCache

KERNELS = {"matmul": matmul_decode_attention, "sdpa": sdpa_decode_attention}


def spread_positions_mask(batch: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A decode mask [B, 1, 1, length] of rows at positions spread over ``0 .. length-1`` (each row sees the
    slots up to its position), as a continuous batch has them."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, length, (batch, 1, 1, 1), generator=g).to(device)
    return torch.arange(length, device=device).view(1, 1, 1, -1) <= positions


def time_kernel(kernel, args: tuple, *, reps: int, warmup: int = 2) -> float:
    """Seconds per call of ``kernel(*args)`` (the mean of ``reps`` calls after ``warmup``)."""
    device = args[0].device
    if device.type == "cuda":  # time the kernels inside a graph, as the decode step runs them (no launch gaps)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                kernel(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                kernel(*args)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / reps
    for _ in range(warmup):
        kernel(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        kernel(*args)
    return (time.perf_counter() - t0) / reps


CLEAR_WIN = 0.85  # the matmul kernel is taken only when it needs at most this share of SDPA's time


def fastest_decode_attention(n_heads: int, k: torch.Tensor, v: torch.Tensor, *, reps: int = 5) -> tuple[str, dict]:
    """The faster kernel for one query per row of ``n_heads`` heads against ``k``, ``v`` [B, Hkv, T, D] (a
    cache's views), and the seconds per call of each."""
    bsz, _, length, head_dim = k.shape
    q = torch.randn(bsz, n_heads, 1, head_dim, device=k.device, dtype=k.dtype)
    mask = spread_positions_mask(bsz, length, k.device)
    seconds = {name: time_kernel(kernel, (q, k, v, mask, None), reps=reps) for name, kernel in KERNELS.items()}
    # SDPA unless the matmuls win clearly: near-ties would otherwise flip with timing noise from one engine (or
    # one run) to the next, and the two kernels round bf16 differently, so sampled tokens would too
    chosen = "matmul" if seconds["matmul"] < CLEAR_WIN * seconds["sdpa"] else "sdpa"
    return chosen, seconds


def choose_decode_kernels(kinds: dict[tuple[int, int], str], seconds: dict[tuple[int, int], dict[str, float]],
                          cache: KVCache, n_heads: int, shapes: list[tuple[int, int]], kind: str) -> None:
    """Fill ``kinds[(rows, length)]`` for every shape not in it yet: ``kind``, or with "auto" the faster
    kernel on the first layer's cache rows / positions of that shape (its timings into ``seconds``)."""
    layer = next(iter(cache.k))
    for rows, length in shapes:
        if (rows, length) in kinds:
            continue
        if kind != "auto":
            kinds[rows, length] = kind
            continue
        k = cache.k[layer][:rows, :, :length]
        v = cache.v[layer][:rows, :, :length]
        kinds[rows, length], seconds[rows, length] = fastest_decode_attention(n_heads, k, v)
