"""FSDP2 (``fully_shard``): each transformer block is one unit of all-gather / reduce-scatter, the root
holds what is left (embeddings, final norm, output head — kept together so tied embeddings share one unit).

With a 2-D mesh ``(dp_replicate, dp_shard)`` this is HSDP: parameters are sharded within a replica group
and gradients all-reduced across replicas. With ``dp_shard`` of size 1 that is plain data parallelism.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

RESHARD_POLICIES = ("default", "always", "never")


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction, or plain fp32 (the parameters' own dtype)."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mixed_precision == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"training.mixed_precision must be 'bf16' or 'fp32' here (resolve 'auto' first), got {mixed_precision!r}")


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: str = "fp32",
    reshard_after_forward: str = "default",
) -> None:
    """``fully_shard`` every block of ``model.layers`` and then the root, in place.

    reshard_after_forward: ``always`` frees gathered weights after each block's forward (all-gather again in
    backward; least memory), ``never`` keeps them until backward (one all-gather per step; most memory),
    ``default`` frees them for every block but the last, whose backward starts right after forward.
    The root is never resharded after forward for the same reason.
    """
    if reshard_after_forward not in RESHARD_POLICIES:
        raise ValueError(
            f"parallelism.fsdp_reshard_after_forward must be one of {RESHARD_POLICIES}, got {reshard_after_forward!r}"
        )
    mp = mixed_precision_policy(mixed_precision)
    blocks = list(model.layers.children())
    for i, block in enumerate(blocks):
        if reshard_after_forward == "always":
            reshard = True
        elif reshard_after_forward == "never":
            reshard = False
        else:
            reshard = i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
