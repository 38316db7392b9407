"""Tensor parallelism (Megatron-style, with sequence parallelism) over PyTorch's ``parallelize_module``.

The residual stream between blocks is sharded on the sequence dimension (``Shard(1)``): norms run on
their sequence shard (``SequenceParallel``), the input of attention / feed-forward is all-gathered, the
q/k/v and gate/up projections are column-sharded (each rank owns whole heads / a slice of the hidden
dimension), and the output / down projections are row-sharded and reduce-scattered back to ``Shard(1)``.
Attention infers its head count from the projection width (``view(B, S, -1, head_dim)``), so it runs on
its local heads unchanged. The embedding is row-sharded over the vocabulary; the output head column-sharded
over the vocabulary, with logits gathered (``Replicate``) or left vocab-sharded for a loss-parallel
cross-entropy (``Shard(-1)``).

Qwen3's per-head q/k RMSNorm weights are replicated; their input is the local heads, so they are marked as
sharded on the head dimension (``SequenceParallel(sequence_dim=2)``) and their gradients are all-reduced
over the TP group by DTensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from posttrain.parallelisms.lora_tp import adapt_tp_plan_for_lora


@dataclass
class TPPlan:
    """``root``: styles for module paths of the whole model; ``block``: styles for paths inside each block."""

    root: dict[str, ParallelStyle] = field(default_factory=dict)
    block: dict[str, ParallelStyle] = field(default_factory=dict)


def dense_decoder_tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    """The plan for the shared dense decoder (Llama 3, Qwen3): module names as in ``common/transformer.py``.

    ``loss_parallel``: ``model(input_ids)`` returns logits as a DTensor sharded over the vocabulary, for a
    cross-entropy under ``torch.distributed.tensor.parallel.loss_parallel()``; it needs an unpadded
    vocabulary (logits are sliced to vocab_size otherwise). The ``output_fn`` path is not affected: its
    function always receives full tensors (see ``_output_fn_pre_hook``).
    """
    args = getattr(model, "args", None)
    if loss_parallel and args is not None and args.padded_vocab_size != args.vocab_size:
        raise ValueError(
            f"parallelism.loss_parallel needs a vocabulary that is a multiple of 64 (logits would be sliced from "
            f"{args.padded_vocab_size} to {args.vocab_size} columns); set parallelism.loss_parallel=false"
        )
    root: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    block: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        # Attention.forward(x, cos, sin, mask): only x is gathered from its sequence shard
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    first_block = next(iter(model.layers.children()))
    if getattr(first_block.attention, "q_norm", None) is not None:
        # input [B, S, local heads, head_dim]: sharded on the head dimension
        block["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return TPPlan(root=root, block=block)


def check_tp_degree(args: Any, tp: int) -> None:
    """Raise with the offending sizes when the model cannot be split ``tp`` ways."""
    checks = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "ffn_dim": args.ffn_dim,
        "padded_vocab_size": args.padded_vocab_size,
    }
    bad = {k: v for k, v in checks.items() if v % tp}
    if bad:
        raise ValueError(
            f"parallelism.tp={tp} does not divide the model's "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + "; choose a tp degree that divides them"
        )


def _gathered(x: Any) -> Any:
    """A DTensor as the plain full tensor (differentiable); anything else unchanged."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _wrap_output_fn(output_fn: Callable) -> Callable:
    def output_fn_on_full_tensors(hidden: torch.Tensor, weight: torch.Tensor) -> Any:
        return output_fn(_gathered(hidden), _gathered(weight))

    output_fn_on_full_tensors._tp_wrapped = True  # type: ignore[attr-defined]
    return output_fn_on_full_tensors


def _output_fn_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """With TP, ``forward(..., output_fn=f)`` calls ``f(hidden, output.weight)`` on sequence-sharded hidden
    states and a vocab-sharded weight; hand ``f`` the full tensors instead (each TP rank computes the same loss,
    DTensor's backward hands every rank its own slice of the gradients)."""
    fn = kwargs.get("output_fn")
    if fn is not None and not getattr(fn, "_tp_wrapped", False):
        kwargs = dict(kwargs, output_fn=_wrap_output_fn(fn))
        return args, kwargs
    if len(args) >= 4 and args[3] is not None and not getattr(args[3], "_tp_wrapped", False):
        args = (*args[:3], _wrap_output_fn(args[3]), *args[4:])
        return args, kwargs
    return None


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: TPPlan) -> None:
    """Parallelize ``model`` in place over ``tp_mesh`` (before activation checkpointing, compile and FSDP).

    Parameters become DTensors on ``tp_mesh``; tied embeddings stay tied (both sides are ``Shard(0)`` over the
    vocabulary). Works on the meta device: no data moves (every rank builds the same model).
    """
    args = getattr(model, "args", None)
    if args is not None:
        check_tp_degree(args, tp_mesh.size())
    tied = getattr(args, "tie_embeddings", False)
    plan = adapt_tp_plan_for_lora(model, plan)  # LoRA-adapted Linears: shard the base and adapters
    # SequenceParallel re-creates parameters with requires_grad=True: keep frozen ones (LoRA) frozen
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for block in model.layers.children():
        parallelize_module(block, tp_mesh, plan.block, src_data_rank=None)
    parallelize_module(model, tp_mesh, plan.root, src_data_rank=None)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    model.register_forward_pre_hook(_output_fn_pre_hook, with_kwargs=True)
