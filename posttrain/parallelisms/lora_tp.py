"""Tensor parallelism for LoRA-adapted Linear modules: rewrite a family's TP plan, whose styles name plain
Linear modules (``attention.wq``), for the ``LoRALinear`` that replaced them (``wq.base`` + adapters).

    column-parallel base (wq, wk, wv, w1, w3; input replicated, output sharded on features):
        base    the family's ColwiseParallel
        lora_a  plain, replicated: its input is the replicated x; its output's gradient comes back complete,
                since ColwiseParallel on lora_b all-reduces the gradient of its (replicated) input
        lora_b  ColwiseParallel, so its output is sharded exactly like the base's
    row-parallel base (wo, w2; input sharded on features, output reduce-scattered to Shard(1) or all-reduced):
        base    the family's RowwiseParallel
        lora_a  RowwiseParallel with the base's output layout (its input is the same feature shard)
        lora_b  with a sequence-sharded output: SequenceParallel (replicated weight, gradient all-reduced by
                DTensor); with a replicated output: plain (every rank sees the same full input)

Adapter dropout would draw different masks on the TP ranks of a replicated input, so it is refused here,
and so is an adapted output head (its ``output_fn`` path merges the weight).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from posttrain.models.common.lora import LoRALinear


def _lora_block_styles(path: str, style) -> dict:
    if isinstance(style, ColwiseParallel):
        return {f"{path}.base": style, f"{path}.lora_b": copy.copy(style)}
    if isinstance(style, RowwiseParallel):
        out = {f"{path}.base": style, f"{path}.lora_a": copy.copy(style)}
        if any(isinstance(p, Shard) for p in style.output_layouts):
            out[f"{path}.lora_b"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        return out
    raise ValueError(f"LoRA on {path} under tensor parallelism: no rule for its style {type(style).__name__}")


def adapt_tp_plan_for_lora(model: nn.Module, plan):
    """``plan`` (a TPPlan) with every block style that targets a LoRALinear split over its parts; ``plan``
    unchanged when the model has no adapters."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return plan
    for module in model.modules():
        if isinstance(module, LoRALinear) and not isinstance(module.dropout, nn.Identity):
            raise ValueError("lora.dropout > 0 is not supported with parallelism.tp > 1; set lora.dropout = 0")
    if isinstance(getattr(model, "output", None), LoRALinear):
        raise ValueError("lora.targets 'output' is not supported with parallelism.tp > 1; drop it")
    first_block = next(iter(model.layers.children()))
    block = {}
    for path, style in plan.block.items():
        try:
            target = first_block.get_submodule(path) if path else first_block
        except AttributeError:  # a path the family's plan names but this block lacks: left to the plan
            target = None
        if isinstance(target, LoRALinear):
            block.update(_lora_block_styles(path, style))
        else:
            block[path] = style
    return type(plan)(root=dict(plan.root), block=block)
