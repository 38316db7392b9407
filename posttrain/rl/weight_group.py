"""The weight-update group: a torch.distributed group of policy rank 0 (group rank 0) and every rollout engine
(ranks 1..n), apart from the trainer's own group, that carries the weight sync of `grpo.weight_sync =
"collective"` (verl / OpenRLHF's NCCL weight-update group).

It has its own rendezvous (a `TCPStore` served by policy rank 0) and is built from the backend classes directly
(`ProcessGroupNCCL` on CUDA, `ProcessGroupGloo` on CPU), without `init_process_group`: the policy's processes
already have a default group and the engines need none. It is created once at setup and closed with the workers.
Per bucket, rank 0 sends the layout (names, shapes, dtypes, byte offsets) through the caller's channel (Ray, a
few hundred bytes a tensor) and broadcasts the bucket's bytes as one flat buffer; each engine receives into a
buffer on its own device and takes views of it. Every collective has the group's timeout: a dead peer makes the
others fail after it instead of waiting forever (NCCL: the watchdog aborts the communicator).
NCCL refuses two ranks on one GPU, so engines colocated with the policy on CUDA use CUDA IPC instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["WeightGroup", "bucket_layout", "host_store", "join_weight_group", "receive_bucket", "send_bucket"]

_ALIGN = 16  # bytes: every tensor starts at an offset its dtype can be viewed from

# (hf_name, shape, dtype name, byte offset) per tensor; the flat buffer's size last
BucketLayout = tuple[list[tuple[str, tuple[int, ...], str, int]], int]


@dataclass
class WeightGroup:
    store: dist.Store
    backend: dist.ProcessGroup  # the backend object itself (ProcessGroupGloo / ProcessGroupNCCL)
    rank: int
    world_size: int
    device: torch.device

    def close(self) -> None:
        """Free the communicator and the store (rank 0 stops serving the rendezvous)."""
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.backend = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


def host_store(world_size: int, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """The group's rendezvous, served by rank 0 on a free port (the OS picks it: no race with other jobs)."""
    store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return store, store.port


def join_weight_group(rank: int, world_size: int, *, device: torch.device | str, timeout_s: float,
                      store: dist.Store | None = None, host: str = "", port: int = 0) -> WeightGroup:
    """Join the group as `rank` (0: pass `host_store`'s store; others: its `host` and `port`). Blocks until every
    rank has joined or `timeout_s` passes. NCCL when `device` is CUDA, gloo otherwise."""
    device = torch.device(device)
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        backend = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    backend._set_sequence_number_for_group()  # as init_process_group does: the ranks agree on the sequence
    group = WeightGroup(store, backend, rank, world_size, device)
    probe = torch.ones(1, device=device)  # connects every rank now (NCCL builds its communicator lazily)
    _broadcast(group, probe)
    return group


def _broadcast(group: WeightGroup, buffer: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    group.backend.broadcast([buffer], options).wait()
    if buffer.is_cuda:  # the buffer is complete (receiver) / free to reuse (sender) on return
        torch.cuda.synchronize(buffer.device)


def bucket_layout(bucket: list[tuple[str, torch.Tensor]]) -> BucketLayout:
    """Where each tensor of the bucket lies in its flat byte buffer."""
    entries, offset = [], 0
    for name, tensor in bucket:
        entries.append((name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return entries, offset


def _views(buffer: torch.Tensor, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, shape, dtype_name, offset in layout[0]:
        dtype = getattr(torch, dtype_name)
        nbytes = math.prod(shape) * dtype.itemsize
        out.append((name, buffer[offset : offset + nbytes].view(dtype).view(shape)))
    return out


def send_bucket(group: WeightGroup, bucket: list[tuple[str, torch.Tensor]], layout: BucketLayout) -> None:
    """Rank 0: broadcast the bucket's tensors as one flat buffer on the group's device."""
    buffer = torch.empty(layout[1], dtype=torch.uint8, device=group.device)
    for (_, tensor), (_, view) in zip(bucket, _views(buffer, layout)):
        view.copy_(tensor)
    _broadcast(group, buffer)


def receive_bucket(group: WeightGroup, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """An engine: the bucket rank 0 broadcasts, as views of a fresh buffer on this rank's device (a fresh one
    per bucket: an engine may hold tensors of one bucket until a later one completes a fused layer)."""
    buffer = torch.empty(layout[1], dtype=torch.uint8, device=group.device)
    _broadcast(group, buffer)
    return _views(buffer, layout)
