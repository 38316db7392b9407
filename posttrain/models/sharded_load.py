"""Fill a parallelized model's local shards: from an HF safetensors folder, from a full state dict, or by
random init.

The model was built on the meta device, parallelized (parameters are DTensors: FSDP ``Shard(0)``, TP
``Shard(d)`` / ``Replicate``, nested), then materialized with ``to_empty(device=...)``. For each parameter
this rank computes which slice of the global tensor its local shard is (from the DTensor's mesh and
placements) and reads exactly that slice: ``safe_open(...).get_slice(name)[rows, cols]``. No rank ever
holds the full model; each file is opened per tensor, so not even the memory-mapped pages of other tensors
stay resident.

Plain (non-DTensor) parameters are treated as one shard covering the whole tensor, so the same functions
work for a single-process model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from posttrain.models.hf import (
    read_hf_config,
    resolve_hf_folder,
    safetensors_files,
    spec_for_hf_config,
)
from posttrain.models.common.heads import is_head_param
from posttrain.models.common.lora import base_param_name, is_adapter_param
from posttrain.models.common.stacked_names import expand_stacked, is_stacked
from posttrain.models import protocol as model_hooks
from posttrain.models.registry import ModelSpec, build_model, get_model_spec_for

_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # derived buffers some checkpoints store
# wrapper segments that parallelization adds to parameter names (activation checkpointing, compile, FSDP1)
_WRAPPER_PARTS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")

# read(name, slices) -> the tensor at [slices] of the named full parameter (canonical posttrain names)
SliceReader = Callable[[str, tuple[slice, ...]], torch.Tensor]


def canonical_name(name: str) -> str:
    """A parameter name without wrapper segments: ``layers.0._checkpoint_wrapped_module.x`` -> ``layers.0.x``."""
    return _WRAPPER_PARTS.sub("", name)


def base_model_name(name: str) -> str | None:
    """The name a parameter has in the base model's checkpoint: wrappers removed, a LoRA base weight under
    its Linear's name; None for parameters no base checkpoint holds (LoRA adapters, non-LM heads)."""
    name = canonical_name(name)
    if is_adapter_param(name) or is_head_param(name):
        return None
    return base_param_name(name)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_shard(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's local tensor of ``t`` and the slice of the global tensor it holds.

    Sharding on one dimension by several mesh dimensions (FSDP ``Shard(0)`` over a TP ``Shard(0)``) gives a
    contiguous block here; the local shape is checked against the computed slice.
    """
    if not _is_dtensor(t):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(
            f"local shard shape {tuple(local.shape)} does not match the computed {tuple(shape)} "
            f"for placements {t.placements}"
        )
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def fill_local_shards(
    model: nn.Module,
    read: SliceReader,
    *,
    vocab_size: int | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Copy ``read(name, slices)`` into every parameter's local shard; returns the names filled.

    ``vocab_size``: rows of the embedding / output head beyond it (vocabulary padding) are zeroed, and only
    rows below it are read. ``names`` restricts which parameters (canonical names) are filled.
    """
    filled = []
    for raw_name, param in model.named_parameters():  # a tied head appears once, as tok_embeddings.weight
        name = base_model_name(raw_name)
        if name is None:
            continue  # adapters and extra heads are initialized on their own
        if names is not None and name not in names:
            continue
        local, slices = local_shard(param)
        filled.append(name)
        if local.numel() == 0:
            continue
        if vocab_size is not None and name in _VOCAB_PARAMS and param.shape[0] > vocab_size:
            rows = slices[0]
            real_stop = min(rows.stop, vocab_size)
            n_real = max(real_stop - rows.start, 0)
            if n_real:
                local[:n_real].copy_(read(name, (slice(rows.start, real_stop), *slices[1:])))
            local[n_real:].zero_()
            continue
        local.copy_(read(name, slices))
    return filled


def load_full_state_dict_sharded(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors, keyed by canonical names, into the local shards.

    For tests and small models, where every rank may hold the full state; each rank copies only its slices.
    """
    vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
    sd = {base_param_name(canonical_name(k)): v for k, v in state_dict.items()}

    def read(name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return sd[name][slices]

    fill_local_shards(model, read, vocab_size=vocab_size if _has_unpadded_vocab(sd, vocab_size) else None)


def _has_unpadded_vocab(sd: dict[str, torch.Tensor], vocab_size: int | None) -> bool:
    emb = sd.get("tok_embeddings.weight")
    return vocab_size is not None and emb is not None and emb.shape[0] == vocab_size


def _hf_tensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (the safetensors file holding it, its shape); reads only the files' headers."""
    out = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = (file, tuple(f.get_slice(key).get_shape()))
    return out


def _check_checkpoint(model: nn.Module, spec: ModelSpec, tensors: dict[str, tuple[Path, tuple[int, ...]]],
                      folder: Path, vocab_size: int | None = None) -> None:
    """Every parameter present with its shape (vocabulary rows up to vocab_size), no unexpected weights."""
    args = getattr(model, "args", None)
    vocab_size = vocab_size or getattr(args, "vocab_size", None)
    tied = bool(getattr(args, "tie_embeddings", False))
    missing, bad_shape, expected = [], [], set()
    for raw_name, param in model.named_parameters():
        name = base_model_name(raw_name)
        if name is None:
            continue
        hf_name = spec.to_hf_name(name)
        if hf_name is not None and is_stacked(hf_name):  # MoE experts [E, ...]: one checkpoint tensor per row
            for row_name in expand_stacked(hf_name, param.shape[0]):
                if row_name not in tensors:
                    missing.append(f"{row_name} (-> {name})")
                elif tensors[row_name][1] != tuple(param.shape[1:]):
                    bad_shape.append(f"{row_name}: checkpoint {tensors[row_name][1]}, model {tuple(param.shape[1:])}")
                expected.add(row_name)
            continue
        if hf_name is None or hf_name not in tensors:
            missing.append(f"{hf_name or '?'} (-> {name})")
            continue
        expected.add(hf_name)
        want = tuple(param.shape)
        if name in _VOCAB_PARAMS and vocab_size is not None:
            want = (vocab_size, *want[1:])
        if tensors[hf_name][1] != want:
            bad_shape.append(f"{hf_name}: checkpoint {tensors[hf_name][1]}, model {want}")
    tied_head = spec.to_hf_name("output.weight") if tied else None
    unexpected = [
        k for k in tensors if k not in expected and k != tied_head and not _IGNORED_HF_KEYS.match(k)
    ]
    if missing or bad_shape or unexpected:
        lines = [f"checkpoint {folder} does not match the {spec.name} model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): " + "; ".join(bad_shape[:20]))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        raise KeyError("\n".join(lines))


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return (p._local_tensor if hasattr(p, "_local_tensor") else p).device


@torch.no_grad()
def load_hf_weights_sharded(
    model: nn.Module,
    hf_dir: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    *,
    checkpoint_vocab_size: int | None = None,
) -> None:
    """Read an HF safetensors folder straight into the local shards of a parallelized, ``to_empty``'d model.

    Every rank calls it (no collectives); each reads only the slices its shards own. Vocabulary padding rows
    are zeroed; a tied head is the embedding (a stored ``lm_head.weight`` is then ignored). Non-persistent
    buffers (RoPE) are recomputed. Raises, naming the keys, when the checkpoint lacks a parameter, has one of
    another shape, or holds weights the model has no place for.

    ``checkpoint_vocab_size``: the checkpoint's vocabulary when the model's was grown (added tokens); rows
    from there on are zeroed here (see ``posttrain.models.vocab_growth``). LoRA base weights load under
    their Linear's name; adapters and non-LM heads are left alone (initialize them afterwards).
    """
    folder = resolve_hf_folder(hf_dir)
    spec = spec or spec_for_hf_config(read_hf_config(folder))
    tensors = _hf_tensors(folder)
    _check_checkpoint(model, spec, tensors, folder, checkpoint_vocab_size)
    vocab_size = checkpoint_vocab_size or getattr(getattr(model, "args", None), "vocab_size", None)

    def read(name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        hf_name = spec.to_hf_name(name)
        if is_stacked(hf_name):  # the rows of a stacked (MoE expert) parameter, one checkpoint tensor each
            rows = expand_stacked(hf_name, slices[0].stop)[slices[0]]
            return torch.stack([read_hf(row, slices[1:]) for row in rows])
        return read_hf(hf_name, slices)

    def read_hf(hf_name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        # one open per tensor: its mapping (and the pages it touched) is released right after
        with safe_open(str(tensors[hf_name][0]), framework="pt", device="cpu") as f:
            return f.get_slice(hf_name)[slices]

    fill_local_shards(model, read, vocab_size=vocab_size)
    model_hooks.init_buffers(model, _param_device(model))


def _dtensor_rng_distinguishes_shards(model: nn.Module) -> bool:
    """Whether DTensor random ops give each shard its own random numbers (on accelerators; on the CPU every
    shard would draw the same numbers, repeating blocks across the full tensor)."""
    for p in model.parameters():
        if _is_dtensor(p):
            return p.device_mesh.device_type != "cpu"
    return True


@torch.no_grad()
def init_weights_sharded(model: nn.Module, seed: int, buffer_device: torch.device | str | None = None) -> None:
    """Random init of a ``to_empty``'d (possibly parallelized) model, same seed on every rank.

    On accelerators ``model.init_weights()`` runs on the DTensors directly: DTensor's RNG gives every shard
    distinct values from the seed, but the values depend on the layout (measured on 2 H200s with torch
    2.11: FSDP x2, TP x2 and one device give different weights for the same seed). On the CPU, where
    DTensor's RNG would repeat the same numbers in every shard, the full model is built once per rank with
    ``seed`` and each rank copies its slices: the result equals a single-process init with that seed,
    whatever the layout (CPU runs are debug-sized, so the full copy is small).
    """
    buffer_device = buffer_device or _param_device(model)
    if _dtensor_rng_distinguishes_shards(model):
        torch.manual_seed(seed)
        model.init_weights(buffer_device=buffer_device)
        return
    spec = get_model_spec_for(model)
    torch.manual_seed(seed)
    reference = build_model(spec.name, model.args, device="cpu")
    load_full_state_dict_sharded(model, {k: v for k, v in reference.named_parameters()})
    del reference
    model_hooks.init_buffers(model, buffer_device)
