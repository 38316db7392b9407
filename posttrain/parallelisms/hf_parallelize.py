"""Build and parallelize a model of the Hugging Face fallback backend (``model.backend = "hf"``).

Same order as the native families, minus tensor parallelism (transformers models have no posttrain TP plan):
activation checkpointing per decoder layer -> torch.compile per decoder layer (optional) -> FSDP2 per decoder
layer, then the root (embeddings, final norm and head together, so tied embeddings share one unit).
What does not apply is refused here, at start, with the setting to change.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.config.sections import (
    ActivationCheckpointSection,
    CompileSection,
    ModelSection,
    ParallelismSection,
)
from posttrain.models.hf import resolve_hf_folder, safetensors_files
from posttrain.models.hf_backend import (
    HFCausalLM,
    build_hf_causal_lm,
    init_hf_backend_weights,
    load_hf_backend_weights,
    load_hf_config,
)
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing
from posttrain.parallelisms.activation_offload import apply_activation_offloading
from posttrain.parallelisms.compile import apply_compile
from posttrain.parallelisms.fsdp import apply_fsdp
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.parallelisms.parallelize import resolve_mixed_precision

logger = logging.getLogger("posttrain")


def parallelize_hf(
    model: HFCausalLM,
    parallel_dims: ParallelDims,
    *,
    mixed_precision: str = "auto",
    ac: ActivationCheckpointSection | None = None,
    compile: CompileSection | None = None,
    parallelism: ParallelismSection | None = None,
) -> nn.Module:
    """Activation checkpointing -> compile -> FSDP over ``model.layers`` (the HF decoder layers), in place."""
    ac = ac or ActivationCheckpointSection()
    compile = compile or CompileSection()
    parallelism = parallelism or ParallelismSection()
    if parallel_dims.tp_enabled:
        raise SystemExit(
            "parallelism.tp > 1 is not available with model.backend = 'hf' (a transformers model has no posttrain "
            "tensor-parallel plan); shard with parallelism.dp_shard / dp_replicate instead, or port the family "
            "natively (README, 'Adding a model')"
        )
    if parallelism.loss_parallel:
        raise SystemExit("parallelism.loss_parallel needs tensor parallelism, which model.backend = 'hf' does not have")
    device_type = parallel_dims.device_type or "cpu"
    if ac.mode == "budget" and not compile.enabled:
        raise SystemExit("activation_checkpoint.mode = 'budget' works through torch.compile; set compile.enabled = true")
    apply_activation_checkpointing(model, ac.mode, ac.every_n, ac.memory_budget, ac.skip_last)
    apply_activation_offloading(model, ac.offload_blocks)
    if compile.enabled:
        # HF layers take keyword inputs and may branch on config values: allow graph breaks
        apply_compile(model, fullgraph=False, device_type=device_type, recompute_pointwise=compile.recompute_pointwise)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model,
            parallel_dims.fsdp_mesh,
            mixed_precision=resolve_mixed_precision(mixed_precision, device_type),
            reshard_after_forward=parallelism.fsdp_reshard_after_forward,
        )
    return model


def _attn_implementation(attn_backend: str) -> str:
    if attn_backend == "flex":
        raise SystemExit(
            "model.attn_backend = 'flex' uses posttrain's FlexAttention masks, which a transformers model does not "
            "take; with model.backend = 'hf' use 'auto' or 'sdpa' (transformers' sdpa attention)"
        )
    return "sdpa"


def build_parallel_hf_model(
    model_cfg: ModelSection,
    *,
    parallel_dims: ParallelDims,
    device: torch.device,
    mixed_precision: str,
    ac: ActivationCheckpointSection,
    compile: CompileSection,
    parallelism: ParallelismSection,
    seed: int,
    packing: str,
    tokenizer_vocab_size: int,
    lora_rank: int = 0,
) -> HFCausalLM:
    """Meta build -> parallelize -> ``to_empty`` -> load the checkpoint's weights (or init randomly when the
    folder has a config.json but no weights)."""
    if not model_cfg.hf_path:
        raise SystemExit("model.backend = 'hf' needs model.hf_path: an HF folder (or hub id) with config.json")
    if lora_rank > 0:
        raise SystemExit("lora.rank > 0 is not available with model.backend = 'hf' (posttrain's LoRA adapts the "
                         "native module names); set lora.rank = 0 or use a native family")
    if getattr(model_cfg, "head", "lm") != "lm":
        raise SystemExit(f"model.head = {model_cfg.head!r} is not available with model.backend = 'hf' (only the "
                         "model's own language-model head); use a native family")
    for name in ("vocab_size", "overrides"):
        if getattr(model_cfg, name, None):
            raise SystemExit(f"model.{name} is for native from-scratch models; with model.backend = 'hf' the "
                             f"sizes come from {model_cfg.hf_path}/config.json (edit it there)")
    folder = resolve_hf_folder(model_cfg.hf_path)
    config = load_hf_config(folder, _attn_implementation(model_cfg.attn_backend))
    try:
        model = build_hf_causal_lm(config, on_meta=True, attn_implementation=config._attn_implementation)
    except ValueError as err:
        raise SystemExit(f"model.backend = 'hf' cannot train {folder}: {err}") from err
    if tokenizer_vocab_size > model.args.vocab_size:
        raise SystemExit(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocabulary is {model.args.vocab_size}; "
            "use the model's own tokenizer (tokenizer.path) or a model with a larger vocabulary (growing the "
            "vocabulary for added tokens is not available with model.backend = 'hf')"
        )
    if packing != "padding" and not model.supports_packed_documents:
        raise SystemExit(
            f"{type(model.hf_model).__name__} does not build its attention masks through transformers' "
            "masking_utils, so packed documents would attend to each other; set data.packing = 'padding'"
        )
    parallelize_hf(model, parallel_dims, mixed_precision=mixed_precision, ac=ac, compile=compile,
                   parallelism=parallelism)
    if model_cfg.dtype == "bfloat16":
        model.to(dtype=torch.bfloat16)  # the RoPE buffers are restored in fp32 by to_empty
    model.to_empty(device=device)
    if _has_weights(folder):
        load_hf_backend_weights(model, folder)
    else:
        logger.info("%s holds no weights: random init (seed %d)", folder, seed)
        init_hf_backend_weights(model, seed)
    return model


def _has_weights(folder: Path) -> bool:
    try:
        return bool(safetensors_files(folder))
    except FileNotFoundError:
        return any(folder.glob("pytorch_model*.bin"))
