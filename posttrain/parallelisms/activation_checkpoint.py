"""Activation checkpointing: trade recomputation in backward for activation memory.

Modes (``ActivationCheckpointSection.mode``):
- ``none``: keep every activation.
- ``full``: every transformer block is wrapped; only its input is kept, the block is recomputed in backward.
- ``selective``: like ``full`` but only every ``every_n``-th block (a memory/speed dial between none and full).
- ``op``: every block is wrapped, but the outputs of the expensive ops (matmuls, attention kernels,
  reduce-scatters) are saved, so backward recomputes only the cheap pointwise ops (norms, activations, rope).
- ``skip_last`` (with ``full`` / ``selective`` / ``op``): the last ``skip_last`` blocks are not checkpointed. A
  step's peak memory usually comes at the end of backward, when every gradient exists beside the weights and the
  optimizer states; the last blocks are the first to run backward, so their activations are freed while few
  gradients exist yet. Until their saved activations exceed the gradients of the blocks still to come, leaving
  them unwrapped costs no peak memory and saves their recomputation.
- ``budget``: no wrapper; torch.compile's min-cut partitioner keeps at most ``memory_budget`` (a share, 0..1)
  of the activation memory each compiled block would otherwise save, recomputing the ops that cost the least
  runtime per byte freed (``torch._functorch.config.activation_memory_budget``, as torchtitan's
  ``memory_budget`` mode). Needs compile. The setting is process-wide and read when a graph is compiled, so
  every other mode resets it to 1.0 (keep everything), and it also applies to a compiled loss.

Blocks are replaced in ``model.layers`` by a ``CheckpointWrapper``; parameter names gain a
``_checkpoint_wrapped_module.`` segment, while ``state_dict()`` keys stay unchanged (the wrapper strips it).

With compile, ``full`` / ``selective`` blocks compile the wrapped block and keep the (eager, non-reentrant)
checkpoint outside the compiled code; ``op`` blocks compile the wrapper, since its save policy acts on the ops
dynamo traces (``block_to_compile``). Dynamo tracing the checkpoint around FlexAttention gave wrong losses and
gradients on CUDA (torch 2.11; an H200 run, 2026-12-02).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._functorch.config
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective", "op", "budget")


def _op_save_list() -> set:
    """Ops whose outputs op-level selective checkpointing keeps instead of recomputing."""
    aten = torch.ops.aten
    names = [
        (aten, "mm"),
        (aten, "addmm"),
        (aten, "bmm"),
        (aten, "_scaled_mm"),
        (aten, "_scaled_dot_product_flash_attention"),
        (aten, "_scaled_dot_product_efficient_attention"),
        (aten, "_scaled_dot_product_cudnn_attention"),
        (aten, "_scaled_dot_product_flash_attention_for_cpu"),
    ]
    ops = set()
    for ns, name in names:
        op = getattr(ns, name, None)
        if op is not None:
            ops.add(op.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def op_selective_context_fn() -> Callable:
    """A ``context_fn`` for ``torch.utils.checkpoint`` that saves matmul / attention outputs."""
    save = _op_save_list()

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def wrap_block(block: nn.Module, mode: str) -> nn.Module:
    """Wrap one transformer block for ``full`` (whole-block) or ``op`` (op-level selective) checkpointing."""
    if mode == "op":
        wrapped = checkpoint_wrapper(block, context_fn=op_selective_context_fn, preserve_rng_state=False)
        wrapped.checkpoint_policy_is_traced = True
        return wrapped
    return checkpoint_wrapper(block, preserve_rng_state=False)


def block_to_compile(block: nn.Module) -> nn.Module:
    """The module torch.compile should own for one entry of ``model.layers``: the block itself, or, for a
    whole-block checkpoint or an offloading block (``activation_offload``), the block inside the wrapper (the
    wrapper then runs eagerly around compiled code)."""
    inner = getattr(block, "_checkpoint_wrapped_module", None)
    if inner is None or getattr(block, "checkpoint_policy_is_traced", False):
        return block
    return inner


def is_checkpointed_whole(block: nn.Module) -> bool:
    """Whether this entry of ``model.layers`` recomputes its whole block in backward (``full`` / ``selective``)."""
    return isinstance(block, CheckpointWrapper) and block_to_compile(block) is not block


def set_activation_memory_budget(budget: float) -> None:
    """The share of activation memory compiled graphs keep (1.0: all, torch's default; 0.0: recompute all)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"activation_checkpoint.memory_budget must be in [0, 1], got {budget}")
    torch._functorch.config.activation_memory_budget = budget


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 2, memory_budget: float = 1.0,
                                   skip_last: int = 0) -> None:
    """Wrap ``model.layers`` blocks in place according to ``mode`` (see the module docstring)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode must be one of {AC_MODES}, got {mode!r}")
    if skip_last < 0:
        raise ValueError(f"activation_checkpoint.skip_last must be >= 0, got {skip_last}")
    set_activation_memory_budget(memory_budget if mode == "budget" else 1.0)
    if mode in ("none", "budget"):
        return
    if mode == "selective" and every_n < 1:
        raise ValueError(f"activation_checkpoint.every_n must be >= 1 for selective mode, got {every_n}")
    blocks = list(model.layers.named_children())
    for i, (name, block) in enumerate(blocks):
        if i >= len(blocks) - skip_last:
            continue
        if mode == "selective":
            # blocks every_n-1, 2*every_n-1, ...: with every_n=1 this is full checkpointing
            if (i + 1) % every_n != 0:
                continue
            wrapped = wrap_block(block, "full")
        else:
            wrapped = wrap_block(block, mode)
        model.layers.register_module(name, wrapped)


__all__ = [
    "AC_MODES", "apply_activation_checkpointing", "block_to_compile", "is_checkpointed_whole", "op_selective_context_fn", "set_activation_memory_budget", "wrap_block",
]
