"""CUDA graphs of the decode step, one per (batch-size bucket, attended-length bucket).

A step over ``n`` slots attending to ``length`` cache positions (``decode_step``) has fixed shapes and reads and writes only persistent buffers (the
slot cache, the slot state, the weights), so it is captured once per bucket and replayed: one launch per token
instead of hundreds of kernel launches from Python. The graphs share one memory pool and are captured from
the largest bucket down. Sampling inside a graph uses the device's default generator (graph-safe in PyTorch);
the engine seeds it around a ``generate`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class DecodeGraphs:
    """``replay(shape)`` runs the captured ``step(shape)``, a shape being ``(slots, length)``. Capturing runs each
    step twice first (warm-up): call this when a step changes nothing that matters (all slots free)."""

    def __init__(self, step: Callable[[tuple[int, int]], None], shapes: Iterable[tuple[int, int]], *,
                 warmup: int = 2) -> None:
        sizes = sorted(set(shapes), key=lambda shape: shape[0] * shape[1], reverse=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for n in sizes:
                for _ in range(warmup):
                    step(n)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        for n in sizes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step(n)
            self.graphs[n] = graph
        torch.cuda.synchronize()

    def replay(self, shape: tuple[int, int]) -> None:
        self.graphs[shape].replay()
