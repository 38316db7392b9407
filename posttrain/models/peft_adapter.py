"""Export a model's LoRA adapters in PEFT's format, loadable by ``peft.PeftModel.from_pretrained(base, dir)``.

    <dir>/adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules (HF names)
    <dir>/adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in] / lora_B.weight [out, r]

PEFT scales the update by lora_alpha / r, as ``LoRALinear`` does, and applies dropout to the adapters'
input, as here. Works with FSDP (DTensor) parameters: call on every rank; rank 0 writes.

Adapters on the stacked MoE experts (``ExpertLoRA``, target ``experts``) export as PEFT's adapters on
parameters (``target_parameters``: transformers >= 5 holds the experts fused, ``mlp.experts.gate_up_proj``
and ``mlp.experts.down_proj``, which our ``gate_up`` / ``down`` slots mirror). PEFT keeps them in one
``lora.ParamWrapper`` per parameter, nested in the parameters' registration order (gate_up_proj inside,
down_proj outside), and lays the experts out flat: ``lora_A.weight`` [E * r, in] (expert-major) and
``lora_B.weight`` [out, r * E] (expert-minor), so

    <experts>.base_layer.lora_{A,B}.weight   gate_up_proj's adapter
    <experts>.lora_{A,B}.weight              down_proj's adapter

This needs PEFT >= 0.17 (``target_parameters``) on transformers >= 5 (fused experts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from posttrain.models.common.lora import ExpertLoRA, expert_lora_modules, lora_modules
from posttrain.models.registry import get_model_spec_for
from posttrain.models.serving_files import make_readable, save_tokenizer, write_serving_config

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# our expert adapter slot -> (the HF fused expert parameter, PEFT's wrapper nesting under the experts module)
_EXPERT_SLOTS = {"gate_up": ("gate_up_proj", "base_layer."), "down": ("down_proj", "")}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _hf_experts_module(spec, path: str) -> str:
    """``layers.3.feed_forward.experts.lora.gate_up`` -> ``model.layers.3.mlp.experts`` (the HF module)."""
    experts = path.rsplit(".lora.", 1)[0]
    for leaf in ("w2", "down_proj"):  # a stacked weight both layouts have: Qwen3-MoE's w2, GPT-OSS's down_proj
        hf = spec.to_hf_name(f"{experts}.{leaf}")
        if hf is not None:
            return hf.split(".experts.", 1)[0] + ".experts"
    raise KeyError(f"{experts} has no Hugging Face name in the {spec.name} adapter")


def _peft_expert_tensors(adapter: ExpertLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [E * r, in], lora_B [out, r * E]) in PEFT's ParamWrapper layout."""
    a = _full(adapter.lora_a.weight.detach()).to("cpu", torch.float32)  # [E, r, in]
    b = _full(adapter.lora_b.weight.detach()).to("cpu", torch.float32)  # [E, out, r]
    n_experts, rank, _ = a.shape
    return a.reshape(n_experts * rank, -1).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], rank * n_experts).contiguous()


def peft_adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensor names -> full fp32 CPU tensors, and the LoRA settings of ``adapter_config.json``
    (r, lora_alpha, lora_dropout, target_modules, target_parameters)."""
    model = getattr(model, "_orig_mod", model)
    spec = get_model_spec_for(model)
    modules = lora_modules(model)
    experts = expert_lora_modules(model)
    if not modules and not experts:
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
    parameters: set[str] = set()
    for path, adapter in experts.items():
        slot = path.rsplit(".", 1)[-1]
        hf_param, nesting = _EXPERT_SLOTS[slot]
        hf_module = _hf_experts_module(spec, path)
        parameters.add(f"experts.{hf_param}")
        lora_a, lora_b = _peft_expert_tensors(adapter)
        tensors[f"{_PEFT_PREFIX}{hf_module}.{nesting}lora_A.weight"] = lora_a
        tensors[f"{_PEFT_PREFIX}{hf_module}.{nesting}lora_B.weight"] = lora_b
    first = next(iter(modules.values())) if modules else next(iter(experts.values()))
    settings = {
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(getattr(first, "dropout", None), nn.Dropout) else 0.0,
        "target_modules": sorted(targets),
    }
    if parameters:
        settings["target_parameters"] = sorted(parameters)
    return tensors, settings


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str = "",
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32) into ``out_dir``; with `tokenizer`, also
    its files and a ``generation_config.json`` carrying its stop ids over `generation_config` (the base model's),
    so ``GenerationConfig.from_pretrained(out_dir)`` and servers that read the adapter folder stop the turn."""
    tensors, settings = peft_adapter_state(model)
    out = Path(out_dir)
    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_model_name_or_path) or None,
            **settings,
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
        if tokenizer is not None:
            save_tokenizer(tokenizer, out)
            write_serving_config(out, tokenizer, generation_config)
        make_readable(out)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out
