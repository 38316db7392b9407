"""Worker for tests/integration/test_moe_fsdp.py, run under ``torchrun --nproc_per_node=2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _moe_worker.py OUT_DIR HF_DIR``

Qwen3-MoE under FSDP2 (experts sharded on their expert dimension) with full activation checkpointing,
loaded from an HF folder with per-expert tensors by the sharded loader, against the single-process model:
loss and every gradient must match; save_hf from the sharded model must give back the same weights.
Rank 0 writes ``OUT_DIR/result.json``; a failed comparison raises (non-zero exit).
"""

from __future__ import annotations

import os

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.config.sections import ActivationCheckpointSection
from posttrain.models import load_hf, save_hf
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import canonical_name, load_hf_weights_sharded
from posttrain.parallelisms import ParallelDims, get_parallelize_fn


def mean_ce(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(data["input_ids"], position_ids=data["position_ids"], document_ids=data["document_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), data["labels"].flatten())


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        canonical_name(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def main() -> None:
    out_dir, hf_dir = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(1, -1, 1, world_size=world)
    dims.build_mesh("cpu")

    ref = load_hf(hf_dir, router_aux_loss_coef=0.0)
    vocab = ref.args.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2 * world, 20), generator=g)
    split = 13
    data = {
        "input_ids": ids,
        "labels": torch.roll(ids, -1, dims=1),
        "position_ids": torch.cat([torch.arange(split), torch.arange(20 - split)]).expand(2 * world, 20),
        "document_ids": (torch.arange(20) >= split).long().expand(2 * world, 20),
    }
    ref_loss = mean_ce(ref, data)
    ref_loss.backward()
    ref_grads = full_grads(ref)

    model = build_model("qwen3_moe", ref.args, device="meta")
    get_parallelize_fn("qwen3_moe")(model, dims, mixed_precision="fp32", ac=ActivationCheckpointSection(mode="full"))
    model.to_empty(device="cpu")
    load_hf_weights_sharded(model, hf_dir)
    w1 = model.layers["0"].feed_forward.experts.w1
    assert hasattr(w1, "placements") and w1.to_local().shape[0] == ref.args.n_experts // world, w1

    mine = {k: v[rank * 2 : (rank + 1) * 2] for k, v in data.items()}
    loss = mean_ce(model, mine)
    loss.backward()
    counts = model.tokens_per_expert()
    assert all(int(c.sum()) == 2 * 20 * ref.args.n_experts_per_tok for c in counts.values()), counts
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    torch.testing.assert_close(torch.stack(losses).mean(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = full_grads(model)
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    worst = 0.0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, (grad - ref_grads[name]).abs().max().item())

    save_hf(model, out_dir / "hf")  # gathers the sharded experts; rank 0 writes one tensor per expert
    if rank == 0:
        back = load_hf(out_dir / "hf")
        for (name, p), (_, q) in zip(back.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        (out_dir / "result.json").write_text(json.dumps({"max_grad_diff": worst, "loss": ref_loss.item()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
