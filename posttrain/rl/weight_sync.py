"""Trainer -> rollout engine weight sync: the policy's weights as full Hugging Face-named tensors, in buckets.

The names are the HF checkpoint names `save_hf` writes (what `RolloutEngine.update_weights` and vLLM's
`load_weights` take), produced the same way (`posttrain.models.hf._merged_full_tensor`): LoRA adapters merged
into their base weight (W + scaling B A; expert adapters into the stacked expert weights), vocabulary padding
dropped, a tied output head sent once (as the embedding), MoE experts one tensor each.
Sharded parameters (FSDP / TP DTensors) are gathered one tensor at a time with `full_tensor()`, so at most
one bucket of full tensors exists at once; every trainer rank must iterate (the gathers are collectives),
only rank 0 yields. The transport is the caller's business (the caller also measures the time): tensors on
the CPU through the Ray object store, or, for an engine on the same GPU (colocated), CUDA IPC handles of
tensors that stay in the policy's device memory (`share_bucket` / `open_bucket`: a few hundred bytes per tensor
travel, the engine copies device to device), or broadcast over the weight-update group of policy rank 0 and
the engines (`posttrain/rl/weight_group.py`; NCCL on CUDA for split placement, gloo on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from posttrain.models.common.stacked_names import expand_stacked, is_stacked
from posttrain.models.hf import _export_entries, _is_writer, _merged_full_tensor
from posttrain.models.registry import ModelSpec, get_model_spec_for

__all__ = ["hf_weight_buckets", "open_bucket", "share_bucket"]

SharedBucket = list[tuple[str, tuple[Any, tuple]]]


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
    writer = _is_writer()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for entry in _export_entries(model, spec, dtype):
        full = _merged_full_tensor(entry)  # collective for DTensors: every rank, same order
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


def share_bucket(bucket: list[tuple[str, torch.Tensor]]) -> SharedBucket:
    """CUDA IPC handles of a bucket's tensors (picklable; another process on the same GPU opens them with
    `open_bucket`). PyTorch keeps each tensor's memory alive until every process that opened it lets go."""
    from torch.multiprocessing.reductions import reduce_tensor

    for name, tensor in bucket:
        if tensor.device.type != "cuda":
            raise ValueError(f"share_bucket: {name} is on {tensor.device}; CUDA IPC shares device memory only")
    return [(name, reduce_tensor(tensor)) for name, tensor in bucket]


def open_bucket(shared: SharedBucket) -> list[tuple[str, torch.Tensor]]:
    """The tensors behind `share_bucket`'s handles (views of the sending process's device memory)."""
    return [(name, rebuild(*args)) for name, (rebuild, args) in shared]
