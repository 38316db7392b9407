"""Process-group setup for `torchrun` and plain `python` launches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """`auto` picks this rank's GPU when CUDA is present, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("training.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); world size 1 needs none.

    `timeout_s` bounds every collective: a rank that hangs makes the others fail with a timeout error naming
    the collective instead of waiting forever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        store = restart_scoped_store(world_size, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def restart_scoped_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the agent's TCPStore seen through a prefix unique to this restart attempt; None otherwise.

    torchrun's workers share the store its agent hosts (TORCHELASTIC_USE_AGENT_STORE), and the agent keeps
    that one store across `--max-restarts` restarts (static and c10d rendezvous alike), while
    `init_process_group` adds no per-attempt prefix. The restarted workers then find the previous attempt's
    keys, e.g. the dead ranks' gloo addresses (or NCCL unique id), connect to them and hang in
    `init_process_group` until the collective timeout (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT
    is the same on every worker of a node (all of them restart together), so it scopes each attempt.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"posttrain/attempt_{attempt}", store)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
