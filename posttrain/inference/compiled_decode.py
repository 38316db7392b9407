"""Compiled blocks for the native engine's decode steps (``NativeEngine(compile_decode=True)``,
``grpo.engine_compile``).

A decode step of a small model is launch-bound: each layer runs ~45 small kernels (norms, RoPE, SwiGLU, casts,
cache writes) that cost a few microseconds each however few slots decode, so a GRPO rollout's tail (a few long
answers at 16 slots) costs nearly as much per step as a full batch. Compiling each block (whole graph, static
shapes) fuses them; the CUDA graphs then replay the fused kernels. Every (slots, length) bucket, and its decode
attention kernel, compiles once per cache length, shared by all blocks (parameters and cache tensors are graph
inputs: ``LayerKVCache`` holds tensors, not a layer name dynamo would guard on); the compile happens in the graphs'
warm-up. Prefill stays eager: its shapes change with every batch of prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# graphs allowed while decoding: one per (slots, length) bucket, decode-attention kernel and cache length (its
# strides are guarded), ~24 buckets x 2 kernels per cache length; dynamo's default of 8 would stop a fullgraph
# compile with an error (FailOnRecompileLimitHit), not fall back to eager
DECODE_RECOMPILE_LIMIT = 1024


def compile_blocks(model: nn.Module) -> None:
    """Compile every block of ``model.layers`` in place (whole graph, static shapes); again: nothing to do."""
    for block in model.layers.values():
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(fullgraph=True, dynamic=False)


@contextlib.contextmanager
def decoding_compiled(enabled: bool) -> Iterator[None]:
    """Room for every decode bucket's compilation (only while the engine generates)."""
    if not enabled:
        yield
        return
    with torch._dynamo.config.patch(recompile_limit=DECODE_RECOMPILE_LIMIT,
                                    accumulated_recompile_limit=4 * DECODE_RECOMPILE_LIMIT):
        yield


def eager(enabled: bool) -> contextlib.AbstractContextManager:
    """Run compiled blocks eagerly (prefill) when ``enabled``."""
    return torch.compiler.set_stance("force_eager") if enabled else contextlib.nullcontext()
