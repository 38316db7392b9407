"""torch.compile per transformer block.

Each block is compiled in place (``nn.Module.compile``), so module structure, parameter names and
state-dict keys stay as they were; all blocks share one compiled graph because they have identical code
and shapes (two graphs when only some blocks are checkpointed whole: see ``apply_compile``). Compiling per
block (not the whole model) keeps FSDP's per-block hooks outside the graphs and compile time independent of depth.

What a compiled block saves for backward is the min-cut partitioner's choice. By default it will not recompute
a pointwise result that backward has to materialize anyway, such as a norm's output (the input of the q/k/v
matmuls, whose weight gradients need it) or the SwiGLU product (the input of w2), so it saves both the input
of the norm and its output. With ``recompute_pointwise`` it saves the inputs only and rebuilds those results
in backward (an elementwise pass each); no matmul is ever recomputed. Per token, a Qwen3-1.7B block then saves
52 KB instead of 72 KB and a Llama-3.2-1B block 52 KB instead of 76 KB (inductor on a CPU; Liger's kernels keep
about 72 and 76 KB).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any
import logging

import torch
import torch._functorch.config
import torch.nn as nn

from posttrain.parallelisms.activation_checkpoint import block_to_compile, is_checkpointed_whole

logger = logging.getLogger("posttrain")


def prime_lazy_attention_kernels(device_type: str) -> None:
    """Create the attention backend's lazily compiled FlexAttention kernel now.

    Created on first use, it would be assigned to a module global inside a compiled, checkpointed block,
    a side effect dynamo refuses under activation checkpointing ("HOP: Unsafe side effect").
    """
    from posttrain.models.common import attention

    make = getattr(attention, "_flex_attention_fn", None)
    if make is not None and device_type != "meta":
        make(torch.device(device_type))


def set_pointwise_recompute(enabled: bool) -> None:
    """Let the partitioner recompute pointwise results that backward materializes (see the module docstring).

    A process-wide setting of torch._functorch, read when a graph is compiled (at its first call), like
    ``activation_checkpoint.memory_budget``; ``enabled=False`` restores torch's default. A torch without the
    setting keeps its own partitioning (logged once)."""
    config = torch._functorch.config
    if hasattr(config, "ban_recompute_materialized_backward"):
        config.ban_recompute_materialized_backward = not enabled
    elif enabled:
        _warn_setting_missing()


@contextlib.contextmanager
def partitioner_settings_kept() -> Iterator[None]:
    """Restore torch's process-wide partitioner settings (pointwise recompute, the AC memory budget) on exit: a
    frozen model (a reference, a teacher) built after the trained one must not change what the trained one's
    graphs compile with (they compile at their first call, after every model is built)."""
    config = torch._functorch.config
    names = [n for n in ("ban_recompute_materialized_backward", "activation_memory_budget") if hasattr(config, n)]
    saved = {n: getattr(config, n) for n in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


@functools.cache
def _warn_setting_missing() -> None:
    logger.warning("compile.recompute_pointwise: torch %s has no torch._functorch.config."
                   "ban_recompute_materialized_backward; compiled blocks save what torch decides", torch.__version__)


def apply_compile(
    model: nn.Module, *, fullgraph: bool = True, device_type: str = "cuda", recompute_pointwise: bool = False,
    cudagraphs: bool = False, backend: str = "inductor",
) -> None:
    """Compile every block of ``model.layers`` in place (after TP and activation checkpointing; a whole-block
    checkpoint stays outside the compiled code, see ``block_to_compile``).

    ``recompute_pointwise`` applies to the blocks that are not checkpointed whole. A block checkpointed whole keeps
    what it saves only while its own backward runs, so rebuilding pointwise results there would add work and raise
    that backward's peak: inductor fuses the rebuilt SwiGLU product with the SwiGLU backward, so the two saved
    inputs, the product, its gradient and both input gradients (six ``[tokens, ffn]`` buffers) are alive at once,
    where saving the product lets the kernel write one gradient over a saved input (four). On Llama-3.1-8B with
    full checkpointing and ``skip_last`` that backward set the step's memory peak. Those blocks compile as a
    second graph whose partitioner saves pointwise results (torch's default).

    ``cudagraphs``: the blocks compile in "reduce-overhead" mode (inductor's CUDA graph trees) and every forward of
    ``model`` starts a new graph step (see ``_new_cudagraph_step``). ``backend``: torch.compile's (tests use a
    cheaper one than inductor)."""
    blocks = list(model.layers.children())
    all_checkpointed_whole = bool(blocks) and all(is_checkpointed_whole(b) for b in blocks)
    recompute = recompute_pointwise and not all_checkpointed_whole
    set_pointwise_recompute(recompute)
    prime_lazy_attention_kernels(device_type)
    if hasattr(model, "moe_layers") and model.moe_layers():
        # MoE layers keep their forward's aux loss and routed-token counts as attributes. Inside a checkpointed
        # block dynamo refuses that side effect ("HOP: Unsafe side effect") unless it need not replay it in the
        # backward's recomputation, which would only write the same values again ("op" mode traces the checkpoint).
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    mode = "reduce-overhead" if cudagraphs else None
    for block in model.layers.children():
        target = block_to_compile(block)
        if recompute and is_checkpointed_whole(block) and not cudagraphs and _HAS_RECOMPUTE_SETTING:
            # dynamo keeps one cache entry per backend, so these blocks get their own graph
            target.compile(fullgraph=fullgraph, backend=_saving_pointwise_results(backend))
        else:
            target.compile(fullgraph=fullgraph, mode=mode, backend=backend)
    if cudagraphs:
        model.register_forward_pre_hook(_new_cudagraph_step)


_HAS_RECOMPUTE_SETTING = hasattr(torch._functorch.config, "ban_recompute_materialized_backward")


@functools.cache
def _saving_pointwise_results(backend: str) -> Callable[..., Any]:
    """`backend` with the partitioner's pointwise recompute off while it compiles a graph (the partitioner runs
    inside that call; the process-wide setting stays as it is for the other blocks). One object per backend, so
    every whole-checkpointed block shares one cache entry."""
    compile_graph = torch._dynamo.lookup_backend(backend)

    def compile_saving_pointwise_results(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        with torch._functorch.config.patch(ban_recompute_materialized_backward=True):
            return compile_graph(gm, example_inputs)

    return compile_saving_pointwise_results


def _new_cudagraph_step(module: nn.Module, args: tuple) -> None:
    """Inductor's CUDA graph trees start a new step (where each graph's outputs may be overwritten by its next
    replay) at every call into compiled code, unless a backward is pending. Each block is such a call, so in a
    no-grad forward block 2's replay of the shared block graph would overwrite block 1's output, still in use.
    Marking the step once per model forward makes the whole forward, and its backward, one step."""
    torch.compiler.cudagraph_mark_step_begin()
