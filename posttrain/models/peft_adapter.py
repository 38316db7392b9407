"""Export a model's LoRA adapters in PEFT's format, loadable by ``peft.PeftModel.from_pretrained(base, dir)``.

    <dir>/adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules (HF names)
    <dir>/adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in] / lora_B.weight [out, r]

PEFT scales the update by lora_alpha / r, as ``LoRALinear`` does, and applies dropout to the adapters'
input, as here. Works with FSDP (DTensor) parameters: call on every rank; rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from posttrain.models.common.lora import LoRALinear, lora_modules
from posttrain.models.registry import get_model_spec_for

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def peft_adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], LoRALinear]:
    """PEFT tensor names -> full fp32 CPU tensors, the HF target module names, and one adapter (for r/alpha)."""
    model = getattr(model, "_orig_mod", model)
    spec = get_model_spec_for(model)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to export")
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for path, module in modules.items():
        hf_weight = spec.to_hf_name(path + ".weight")
        if hf_weight is None:
            raise KeyError(f"{path} has no Hugging Face name in the {spec.name} adapter")
        hf_module = hf_weight.removesuffix(".weight")
        targets.add(hf_module.rsplit(".", 1)[-1])
        for ours, theirs in ((module.lora_a, "lora_A"), (module.lora_b, "lora_B")):
            full = _full(ours.weight.detach())  # collective under FSDP: every rank, same order
            tensors[f"{_PEFT_PREFIX}{hf_module}.{theirs}.weight"] = full.to("cpu", torch.float32).contiguous()
    return tensors, sorted(targets), next(iter(modules.values()))


def save_peft_adapter(
    model: nn.Module, out_dir: str | os.PathLike[str], *, base_model_name_or_path: str = ""
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32) into ``out_dir``."""
    tensors, targets, first = peft_adapter_state(model)
    out = Path(out_dir)
    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_model_name_or_path) or None,
            "r": first.rank,
            "lora_alpha": first.alpha,
            "lora_dropout": dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        with open(out / ADAPTER_CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out
