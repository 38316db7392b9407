"""Hugging Face checkpoints in and out: ``load_hf`` / ``save_hf``.

Loading builds the model on the meta device, materialises it empty on the target device, then copies the
safetensors one tensor at a time into the parameters (the checkpoint is memory-mapped; there is never a
second full copy of the weights). Saving writes (sharded) safetensors, the index, config.json and
generation_config.json so that ``transformers.AutoModelForCausalLM.from_pretrained`` gives the same logits.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from posttrain.config.input_paths import could_be_hub_id
from posttrain.models.common.heads import get_head, is_head_param
from posttrain.models.common.lora import base_param_name, expert_lora_update, is_adapter_param, lora_modules
from posttrain.models.common.stacked_names import expand_stacked, is_stacked, split_row_index
from posttrain.models.registry import ModelSpec, get_model_spec, get_model_spec_for, resolve_args
from posttrain.models.serving_files import (
    make_readable,
    read_generation_config,
    save_tokenizer,
    write_json,
    write_serving_config,
)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# checkpoint keys that are derived buffers, not weights
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
# wrapper prefixes that appear in state-dict names (torch.compile, activation checkpointing, FSDP1)
_WRAPPER_PARTS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


# ---------------------------------------------------------------------------------------------- loading


def resolve_hf_folder(path: str | os.PathLike[str]) -> Path:
    """A local folder as is; anything else is treated as a Hub repo id and downloaded (safetensors only)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; load_hf wants the checkpoint folder holding config.json")
    if not could_be_hub_id(str(path)):  # no Hub round trip (and its retries) for a mistyped local path
        raise FileNotFoundError(f"{path!r} is not a local folder and cannot be a Hugging Face Hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(path), allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated, ...
        raise FileNotFoundError(
            f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub ({err})"
        ) from err


def read_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    config_path = Path(folder) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: an HF checkpoint folder needs a config.json")
    with open(config_path) as f:
        return json.load(f)


def spec_for_hf_config(config: dict[str, Any]) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no model_type, so the model family is unknown")
    try:
        return get_model_spec(model_type)
    except KeyError as err:
        raise ValueError(
            f"config.json model_type {model_type!r} has no native posttrain implementation ({err.args[0]}); "
            f"set model.backend = \"hf\" to train it through transformers, or port it (README, 'Adding a model')"
        ) from None


def safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {folder}; only safetensors checkpoints are read (convert *.bin files first)"
        )
    return files


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, name: str, hf_name: str) -> None:
    """Copy a checkpoint tensor into a parameter; a vocabulary dimension padded here gets zero rows."""
    if param.shape == tensor.shape:
        param.copy_(tensor)
        return
    if param.dim() == tensor.dim() and param.shape[1:] == tensor.shape[1:] and param.shape[0] > tensor.shape[0]:
        rows = tensor.shape[0]
        param[:rows].copy_(tensor)
        param[rows:].zero_()
        return
    raise ValueError(f"shape mismatch for {hf_name} -> {name}: checkpoint {tuple(tensor.shape)}, "
                     f"model {tuple(param.shape)}")


@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Stream every tensor of the folder's safetensors into ``model``; error on missing or unexpected keys."""
    # a tied head appears once, as tok_embeddings.weight; a LoRA base under its Linear's name; adapters and
    # non-LM heads are not in base checkpoints
    params = {
        base_param_name(n): p for n, p in model.named_parameters() if not (is_adapter_param(n) or is_head_param(n))
    }
    tied = bool(getattr(model.args, "tie_embeddings", False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(Path(folder)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if _IGNORED_HF_KEYS.match(hf_name):
                    continue
                name, row = split_row_index(spec.from_hf_name(hf_name) or "")  # row: one expert of [E, ...]
                if name == "output.weight" and tied:
                    continue  # some tied checkpoints store lm_head too; the embedding is the weight
                if not name or name not in params or (row is not None and row >= params[name].shape[0]):
                    unexpected.append(hf_name)
                    continue
                target = params[name] if row is None else params[name][row]
                _copy_into(target, f.get_tensor(hf_name), name, hf_name)
                loaded.add(name if row is None else f"{name}[{row}]")

    def fully_loaded(n: str) -> bool:
        if is_stacked(spec.to_hf_name(n) or ""):
            return all(f"{n}[{i}]" in loaded for i in range(params[n].shape[0]))
        return n in loaded

    missing = [f"{spec.to_hf_name(n) or n} (-> {n})" for n in params if not fully_loaded(n)]
    if missing or unexpected:
        lines = [f"checkpoint {folder} does not match the {spec.name} model built from its config.json:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        raise KeyError("\n".join(lines))


def load_hf(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **args_overrides: Any,
) -> nn.Module:
    """Load an HF checkpoint (local folder or Hub id) as a posttrain model.

    ``config.json``'s model_type picks the family; ``args_overrides`` replace args fields (e.g.
    ``attn_backend="flex"``). Parameters end up in ``dtype`` on ``device``; RoPE buffers stay fp32.
    """
    folder = resolve_hf_folder(path)
    config = read_hf_config(folder)
    spec = spec_for_hf_config(config)
    args = resolve_args(spec, spec.args_from_hf_config(config), **args_overrides)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.init_buffers()
    load_hf_weights(model, folder, spec)
    model.hf_generation_config = read_generation_config(folder)
    return model


# ---------------------------------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    """Bytes from an int or HF-style string: "5GB" = 5e9, "500MiB" = 500 * 2**20, "200KB", "1000"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB', '2GiB' or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


@dataclass
class _ExportEntry:
    hf_name: str
    tensor: torch.Tensor  # maybe a DTensor
    rows: int | None  # keep the first `rows` rows (drop vocabulary padding)
    nbytes: int
    lora: Any = None  # a LoRALinear whose update scaling * B @ A is merged into this base weight
    experts: Any = None  # an experts module with LoRA: its update of this stacked weight is merged in


def _export_entries(model: nn.Module, spec: ModelSpec, dtype: torch.dtype | None) -> list[_ExportEntry]:
    args = model.args
    entries = []
    loras = lora_modules(model)
    for raw_name, tensor in model.state_dict(keep_vars=True).items():
        name = _WRAPPER_PARTS.sub("", raw_name)
        if is_adapter_param(name):
            continue  # merged into its base weight below
        lora = None
        if base_param_name(name) != name:  # a LoRA base: exported merged, under its Linear's name
            name = base_param_name(name)
            lora = loras.get(name.rsplit(".", 1)[0]) if name.endswith(".weight") else None
        if name == "output.weight" and args.tie_embeddings:
            continue
        owner = model.get_submodule(raw_name.rpartition(".")[0])
        experts = None  # LoRA on stacked experts: (the experts module, this parameter's name in it)
        if getattr(owner, "lora", None) is not None and hasattr(owner, "lora_update"):
            experts = (owner, name.rpartition(".")[2])
        hf_name = name if is_head_param(name) else spec.to_hf_name(name)
        if hf_name is None:
            raise KeyError(f"{name} has no Hugging Face name in the {spec.name} adapter")
        shape = list(tensor.shape)
        rows = None
        if name in ("tok_embeddings.weight", "output.weight") and shape[0] != args.vocab_size:
            rows = shape[0] = args.vocab_size
        itemsize = (dtype or tensor.dtype).itemsize
        entries.append(_ExportEntry(hf_name, tensor, rows, itemsize * int(torch.Size(shape).numel()), lora, experts))
    return entries


def _plan_shards(entries: list[_ExportEntry], max_bytes: int) -> list[list[_ExportEntry]]:
    shards: list[list[_ExportEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it in the same order)."""
    if hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh"):
        return tensor.full_tensor()
    return tensor


def _merged_full_tensor(entry: _ExportEntry) -> torch.Tensor:
    """The entry's whole tensor with its LoRA update merged in, in fp32 then back to its dtype: W + scaling * B @ A
    for a LoRA linear, W + the adapters' update for stacked experts. Gathers DTensors: a collective, so every
    rank calls it for every entry, in the same order."""
    full = _full_tensor(entry.tensor.detach())
    if entry.lora is not None:
        b = _full_tensor(entry.lora.lora_b.weight.detach()).float()
        a = _full_tensor(entry.lora.lora_a.weight.detach()).float()
        full = (full.float() + entry.lora.scaling * (b @ a)).to(full.dtype)
    if entry.experts is not None:
        update = expert_lora_update(*entry.experts)
        if update is not None:
            full = (full.float() + update).to(full.dtype)
    return full


def _is_writer() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def save_hf(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as an HF checkpoint folder (weights in ``dtype``, default: the parameters' dtype).

    Works with DTensor (FSDP / TP) parameters: call it on every rank; tensors are gathered one by one and
    rank 0 writes. Existing ``model*.safetensors`` files and index in ``out_dir`` are replaced.
    """
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "save_hf"):  # the hf backend's wrapper writes through transformers' save_pretrained
        return model.save_hf(out_dir, tokenizer=tokenizer)
    spec = get_model_spec_for(model)
    out = Path(out_dir)
    writer = _is_writer()
    entries = _export_entries(model, spec, dtype)
    shards = _plan_shards(entries, parse_size(max_shard_size))
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model*.safetensors"), out / SAFE_WEIGHTS_INDEX_NAME]:
            stale.unlink(missing_ok=True)

    weight_map: dict[str, str] = {}
    saved_dtype = dtype
    for shard, file_name in zip(shards, names):
        tensors: dict[str, torch.Tensor] = {}
        for entry in shard:
            full = _merged_full_tensor(entry)
            if not writer:
                continue
            if entry.rows is not None:
                full = full[: entry.rows]
            full = full.to(device="cpu", dtype=dtype or full.dtype).contiguous()
            saved_dtype = saved_dtype or full.dtype
            if is_stacked(entry.hf_name):  # MoE experts [E, ...]: one tensor per expert, as HF checkpoints hold them
                for row_name, row in zip(expand_stacked(entry.hf_name, full.shape[0]), full):
                    tensors[row_name] = row.clone()
                    weight_map[row_name] = file_name
                continue
            tensors[entry.hf_name] = full.clone() if full.untyped_storage().nbytes() != full.nbytes else full
            weight_map[entry.hf_name] = file_name
        if writer:
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        del tensors

    if writer:
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
            write_json(out / SAFE_WEIGHTS_INDEX_NAME, index)
        config = spec.hf_config_from_args(model.args)
        config["torch_dtype"] = str(saved_dtype or torch.float32).removeprefix("torch.")
        head = get_head(model)
        if head is not None:  # a value / classification head: HF's *ForSequenceClassification (score.weight)
            config["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification")
                                       for a in config.get("architectures", [])]
            config["num_labels"] = head.out_features
        write_json(out / CONFIG_NAME, config)
        if tokenizer is not None:
            save_tokenizer(tokenizer, out)
        # eos / end-of-turn ids in config.json and generation_config.json (the source model's, when loaded from one)
        write_serving_config(out, tokenizer, getattr(model, "hf_generation_config", None))
        make_readable(out)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out
