"""Compose the parallelisms of a decoder in the one documented order:

    tensor parallel -> activation checkpointing -> torch.compile -> FSDP

TP first, because it swaps parameters for DTensors on the TP mesh and installs the hooks that move
activations; checkpointing wraps the (TP-ready) blocks; compile traces the wrapped blocks, collectives
included; FSDP last, so it shards the TP DTensors over the data-parallel mesh (2-D parameters) and its
per-block hooks stay outside the compiled graphs.

Call on a model built on the meta device; afterwards ``model.to_empty(device=...)`` and either
``init_weights_sharded`` or ``load_hf_weights_sharded`` (``posttrain.models.sharded_load``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from posttrain.config.sections import ActivationCheckpointSection, CompileSection, ParallelismSection
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing
from posttrain.parallelisms.activation_offload import apply_activation_offloading
from posttrain.parallelisms.compile import apply_compile
from posttrain.parallelisms.fsdp import apply_fsdp
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.models.common.tp_plan import TPPlanFn, dense_decoder_tp_plan
from posttrain.parallelisms.tensor_parallel import apply_tp


def resolve_mixed_precision(mixed_precision: str, device_type: str) -> str:
    """``auto`` -> bf16 on accelerators, fp32 on the CPU."""
    if mixed_precision == "auto":
        return "fp32" if device_type == "cpu" else "bf16"
    return mixed_precision


def _default_device_type() -> str:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return "cpu"


def parallelize_decoder(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    mixed_precision: str = "auto",
    ac: ActivationCheckpointSection | None = None,
    compile: CompileSection | None = None,
    parallelism: ParallelismSection | None = None,
    tp_plan: TPPlanFn | None = dense_decoder_tp_plan,
) -> nn.Module:
    """Apply TP (``tp_plan(model, loss_parallel=...)``), activation checkpointing, compile and FSDP in place.

    The default parallelize function of every family (``get_parallelize_fn``); ``tp_plan`` None: the model
    has no tensor-parallel plan and ``parallelism.tp > 1`` is refused.

    Call ``parallel_dims.build_mesh(device_type)`` first (it also records the device type for a world of 1).
    Returns ``model`` (the same object; FSDP changes its class in place).
    """
    ac = ac or ActivationCheckpointSection()
    compile = compile or CompileSection()
    parallelism = parallelism or ParallelismSection()
    device_type = parallel_dims.device_type or _default_device_type()

    if parallel_dims.tp_enabled:
        if tp_plan is None:
            raise NotImplementedError(
                f"parallelism.tp={parallel_dims.tp}: {type(model).__name__} has no tensor-parallel plan (its "
                "ModelSpec.tp_plan is None); set parallelism.tp=1 and shard with FSDP (parallelism.dp_shard)"
            )
        apply_tp(model, parallel_dims.tp_mesh, tp_plan(model, loss_parallel=parallelism.loss_parallel))

    if ac.mode == "budget" and not compile.enabled:
        raise ValueError("activation_checkpoint.mode = 'budget' works through torch.compile; set compile.enabled = true")
    apply_activation_checkpointing(model, ac.mode, ac.every_n, ac.memory_budget, ac.skip_last)
    apply_activation_offloading(model, ac.offload_blocks)

    if compile.enabled:
        apply_compile(model, device_type=device_type, recompute_pointwise=compile.recompute_pointwise,
                      cudagraphs=compile.cudagraphs and device_type == "cuda")

    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model,
            parallel_dims.fsdp_mesh,
            mixed_precision=resolve_mixed_precision(mixed_precision, device_type),
            reshard_after_forward=parallelism.fsdp_reshard_after_forward,
        )
    return model
