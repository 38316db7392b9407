"""Gemma 3's parallelization: the dense-decoder TP plan plus the two extra (sandwich) norms per block, then
activation checkpointing, compile and FSDP in the shared order."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor.parallel import SequenceParallel

from posttrain.config.sections import ActivationCheckpointSection, CompileSection, ParallelismSection
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.parallelisms.parallelize import parallelize_decoder
from posttrain.parallelisms.tensor_parallel import TPPlan, dense_decoder_tp_plan


def tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    """The post-attention / post-ffn norms act on the row-parallel outputs, already reduce-scattered to the
    sequence shard (``Shard(1)``): SequenceParallel like the pre-norms, handing back local tensors because
    their output joins the (local) residual stream directly. The embedding scale is a plain multiply."""
    plan = dense_decoder_tp_plan(model, loss_parallel=loss_parallel)
    plan.block["post_attention_norm"] = SequenceParallel(use_local_output=True)
    plan.block["post_ffn_norm"] = SequenceParallel(use_local_output=True)
    return plan


def parallelize(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    mixed_precision: str = "auto",
    ac: ActivationCheckpointSection | None = None,
    compile: CompileSection | None = None,
    parallelism: ParallelismSection | None = None,
) -> nn.Module:
    """TP -> activation checkpointing -> compile -> FSDP, in place; returns ``model``."""
    return parallelize_decoder(
        model, parallel_dims, mixed_precision=mixed_precision, ac=ac, compile=compile,
        parallelism=parallelism, tp_plan=tp_plan,
    )
