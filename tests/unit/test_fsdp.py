"""apply_fsdp on a one-rank gloo group: per-block + root units, bf16 compute with fp32 master weights,
policy names checked."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from posttrain.models.registry import build_model
from posttrain.parallelisms.fsdp import apply_fsdp, mixed_precision_policy


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
    finally:
        dist.destroy_process_group()


def test_policy_names():
    assert mixed_precision_policy("bf16").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16").reduce_dtype == torch.float32
    assert mixed_precision_policy("fp32").param_dtype is None
    with pytest.raises(ValueError, match="auto"):
        mixed_precision_policy("auto")


@pytest.mark.parametrize("reshard", ["default", "always", "never"])
def test_blocks_and_root_are_sharded_with_bf16_compute(one_rank_group, reshard):
    torch.manual_seed(0)
    model = build_model("qwen3", "debug", device="cpu", attn_backend="sdpa")
    apply_fsdp(model, one_rank_group, mixed_precision="bf16", reshard_after_forward=reshard)
    assert isinstance(model, FSDPModule)
    assert all(isinstance(b, FSDPModule) for b in model.layers.children())
    assert all(p.dtype == torch.float32 and hasattr(p, "device_mesh") for p in model.parameters())
    logits = model(torch.randint(0, 2048, (2, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_unknown_reshard_policy_is_refused(one_rank_group):
    model = build_model("qwen3", "debug", device="meta")
    with pytest.raises(ValueError, match="fsdp_reshard_after_forward"):
        apply_fsdp(model, one_rank_group, reshard_after_forward="sometimes")
