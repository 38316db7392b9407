"""Llama 3's parallelization: the dense-decoder TP plan (GQA heads split over TP ranks),
then activation checkpointing, compile and FSDP in the shared order. Imported lazily by
``posttrain.parallelisms.get_parallelize_fn`` (the model itself never imports parallelism code)."""

from __future__ import annotations

import torch.nn as nn

from posttrain.config.sections import ActivationCheckpointSection, CompileSection, ParallelismSection
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.parallelisms.parallelize import parallelize_decoder
from posttrain.parallelisms.tensor_parallel import TPPlan, dense_decoder_tp_plan


def tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    """Module names match the shared decoder; no q/k norms in Llama."""
    return dense_decoder_tp_plan(model, loss_parallel=loss_parallel)


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
