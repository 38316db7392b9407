"""Worker for tests/integration/test_lora_experts_parallel.py, under ``torchrun --nproc_per_node=2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _lora_experts_worker.py OUT_DIR FAMILY [FAMILY ...]``

For each MoE family: a debug model with LoRA on its stacked experts (and wq) under FSDP2 (experts and their
adapters sharded on the expert dimension; Qwen3-MoE also with full activation checkpointing) against the
single-process model: adapters initialized by ``init_lora_adapters`` are the same whatever the layout, the loss
and every adapter gradient match, frozen weights get no gradient, and ``save_hf`` (merged) /
``save_peft_adapter`` from the sharded model write the single-process model's tensors. A mismatch raises.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from posttrain.config.sections import ActivationCheckpointSection
from posttrain.models import save_hf
from posttrain.models.common.lora import apply_lora, init_lora_adapters
from posttrain.models.peft_adapter import save_peft_adapter
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import canonical_name, local_shard
from posttrain.parallelisms import ParallelDims, get_parallelize_fn

LORA = dict(rank=4, alpha=8.0, targets=("wq", "experts"))
SIZES = dict(vocab_size=512, router_aux_loss_coef=0.0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _loss(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(data["input_ids"], position_ids=data["position_ids"], document_ids=data["document_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), data["labels"].flatten())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def check_family(family: str, out: Path, dims: ParallelDims) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = build_model(family, "debug", device="cpu", **SIZES)
    apply_lora(ref, **LORA)
    init_lora_adapters(ref, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-zero B, so A gets gradients and merging has something to add
        for n, p in ref.named_parameters():
            if n.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, ref.args.vocab_size, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1),
            "position_ids": torch.arange(16).expand(2 * world, 16).contiguous(),
            "document_ids": (torch.arange(16) >= 9).long().expand(2 * world, 16).contiguous()}
    ref_loss = _loss(ref, data)
    ref_loss.backward()
    ref_grads = {canonical_name(n): p.grad for n, p in ref.named_parameters() if p.requires_grad}

    model = build_model(family, "debug", device="meta", **SIZES)
    apply_lora(model, **LORA)
    ac = ActivationCheckpointSection(mode="full" if family == "qwen3_moe" else "none")
    get_parallelize_fn(family)(model, dims, mixed_precision="fp32", ac=ac)
    model.to_empty(device="cpu")
    model.init_buffers()
    init_lora_adapters(model, seed=3)
    full = {canonical_name(n): p.detach() for n, p in ref.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            local, slices = local_shard(p)
            name = canonical_name(n)
            if name.endswith("lora_a.weight"):  # drawn per layout: must already equal the reference's
                torch.testing.assert_close(local, full[name][slices], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
            local.copy_(full[name][slices])
    w1 = model.get_submodule("layers.0.feed_forward.experts").lora["gate_up"].lora_a.weight
    assert w1.to_local().shape[0] == ref.args.n_experts // world, w1.placements

    mine = {k: v[rank * 2 : (rank + 1) * 2] for k, v in data.items()}
    loss = _loss(model, mine)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {canonical_name(n): _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads) and any(".experts.lora." in n for n in grads), sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # every rank calls the exports (collectives and a barrier inside); rank 0 writes
    save_hf(model, out / family / "sharded_hf")  # merged
    save_peft_adapter(model, out / family / "sharded_adapter")
    save_hf(ref, out / family / "ref_hf")
    save_peft_adapter(ref, out / family / "ref_adapter")
    if rank == 0:
        for kind in ("hf", "adapter"):
            got, want = _tensors(out / family / f"sharded_{kind}"), _tensors(out / family / f"ref_{kind}")
            assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
            for k in got:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        print(f"ok lora experts {family}", flush=True)
    dist.barrier()


def main() -> None:
    out, families = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    try:
        dims = ParallelDims(1, -1, 1, world_size=dist.get_world_size())
        dims.build_mesh("cpu")
        for family in families:
            check_family(family, out, dims)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
