"""Parallelization of the MoE families (Qwen3-MoE, GPT-OSS): FSDP (experts sharded like every other weight, on their expert dimension),
activation checkpointing and compile in the shared order. No tensor parallelism and no expert parallelism
yet: ``parallelism.tp > 1`` is refused."""

from __future__ import annotations

import torch.nn as nn

from posttrain.config.sections import ActivationCheckpointSection, CompileSection, ParallelismSection
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.parallelisms.parallelize import parallelize_decoder
from posttrain.parallelisms.tensor_parallel import TPPlan


def tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    raise NotImplementedError(
        "tensor parallelism is not implemented for the MoE families (qwen3_moe, gpt_oss); set parallelism.tp=1 and shard "
        "with FSDP (parallelism.dp_shard); expert parallelism is planned"
    )


def parallelize(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    mixed_precision: str = "auto",
    ac: ActivationCheckpointSection | None = None,
    compile: CompileSection | None = None,
    parallelism: ParallelismSection | None = None,
) -> nn.Module:
    """Activation checkpointing -> compile -> FSDP, in place; returns ``model``."""
    if parallel_dims.tp_enabled:
        tp_plan(model)
    return parallelize_decoder(
        model, parallel_dims, mixed_precision=mixed_precision, ac=ac, compile=compile,
        parallelism=parallelism, tp_plan=tp_plan,
    )
