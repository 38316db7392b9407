"""Trainer -> rollout engine weight sync: the policy's weights as full Hugging Face-named tensors, in buckets.

The names are the HF checkpoint names `save_hf` writes (what `RolloutEngine.update_weights` and vLLM's
`load_weights` take), produced the same way: LoRA adapters merged into their base weight (W + scaling B A),
vocabulary padding dropped, a tied output head sent once (as the embedding), MoE experts one tensor each.
Sharded parameters (FSDP / TP DTensors) are gathered one tensor at a time with `full_tensor()`, so at most
one bucket of full tensors exists at once; every trainer rank must iterate (the gathers are collectives),
only rank 0 yields. The transport (Ray object store on CPU; NCCL / CUDA IPC is not built yet) is the
caller's business; the caller also measures the time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from posttrain.models.common.stacked_names import expand_stacked, is_stacked
from posttrain.models.hf import _export_entries, _full_tensor
from posttrain.models.registry import ModelSpec, get_model_spec_for

__all__ = ["hf_weight_buckets"]


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


@torch.no_grad()
def hf_weight_buckets(
    model: nn.Module,
    spec: ModelSpec | None = None,
    bucket_bytes: int = 256 * 2**20,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of `(hf_name, full tensor)` of about `bucket_bytes` each (a bigger tensor gets its own).

    Call on every rank of the model's process group; ranks other than 0 yield nothing but take part in
    the gathers. Tensors are detached copies on `device` in `dtype` (default: the parameters' dtype).
    """
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "save_hf"):
        raise NotImplementedError("weight sync of model.backend = 'hf' models is not supported; use the native backend")
    spec = spec or get_model_spec_for(model)
    writer = _is_rank0()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for entry in _export_entries(model, spec, dtype):
        full = _full_tensor(entry.tensor.detach())  # collective for DTensors: every rank, same order
        if entry.lora is not None:
            b = _full_tensor(entry.lora.lora_b.weight.detach()).float()
            a = _full_tensor(entry.lora.lora_a.weight.detach()).float()
            full = (full.float() + entry.lora.scaling * (b @ a)).to(full.dtype)
        if not writer:
            continue
        if entry.rows is not None:
            full = full[: entry.rows]
        full = full.to(device=device, dtype=dtype or full.dtype).clone()
        if is_stacked(entry.hf_name):
            named = [(n, row.clone()) for n, row in zip(expand_stacked(entry.hf_name, full.shape[0]), full)]
        else:
            named = [(entry.hf_name, full)]
        nbytes = full.numel() * full.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(named)
        size += nbytes
    if bucket:
        yield bucket
