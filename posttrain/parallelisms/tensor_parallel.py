"""Tensor parallelism: apply a family's plan (``posttrain/models/common/tp_plan.py``, named by its
``ModelSpec.tp_plan``) with PyTorch's ``parallelize_module``, then check that it covered every parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from posttrain.models.common.tp_plan import TPPlan
from posttrain.parallelisms.lora_tp import adapt_tp_plan_for_lora


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
    check_tp_plan_covers_parameters(model)


def check_tp_plan_covers_parameters(model: nn.Module) -> None:
    """Raise naming every parameter the TP plan left a plain tensor. LoRA adapters that ``lora_tp.py`` keeps
    replicated on purpose are allowed; anything else would mix tensors and DTensors (the optimizer refuses
    that) or, worse, train on a partial gradient."""
    missed = [
        name for name, p in model.named_parameters()
        if not isinstance(p, DTensor) and not _is_replicated_lora_adapter(name)
    ]
    if missed:
        shown = ", ".join(missed[:8]) + (f" (+{len(missed) - 8} more)" if len(missed) > 8 else "")
        raise ValueError(
            f"tensor parallelism: the TP plan of {type(model).__name__} covers no style for {len(missed)} "
            f"parameter(s): {shown}; add a style for their modules to the family's tp_plan (ModelSpec.tp_plan), "
            "or set parallelism.tp=1"
        )


def _is_replicated_lora_adapter(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name
