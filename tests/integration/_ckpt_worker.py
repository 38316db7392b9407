"""Worker for test_checkpoint_distributed.py, launched with torchrun (gloo, CPU).

Each rank trains an FSDP2 (fully_shard) model on its own data, saving checkpoints at --save-at steps, and
writes its per-step losses to <out>/losses_rank<R>_<tag>.json. With --resume-step it first loads that
checkpoint and continues after it. At the end rank 0 writes the full (gathered) model and optimizer state
to <out>/final_<tag>.pt.
"""

from __future__ import annotations

import os
import sys

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from posttrain.config.sections import CheckpointSection


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 8))


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


class RankLoader:
    """Deterministic per-rank batches; the position is per-rank checkpoint state."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 * self.rank + self.position)
        self.position += 1
        x = torch.randn(4, 16, generator=generator)
        return x, x[:, :8].cos()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, nargs="*", default=[])
    parser.add_argument("--resume-step", type=int, default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # dropout masks differ per rank; RNGState carries them over a resume

    model = make_model()
    for layer in (model[0], model[3]):
        fully_shard(layer)
    fully_shard(model)
    optimizer, scheduler = make_optimizer(model)
    loader = RankLoader(rank)
    state = {
        "model": ModelOptimizerState(model, optimizer),
        "scheduler": scheduler,
        "dataloader": loader,
        "rng": RNGState(),
    }
    manager = CheckpointManager(CheckpointSection(keep_last=2), args.out)

    start = 1
    if args.resume_step is not None:
        assert manager.load(state, step=args.resume_step) == args.resume_step
        start = args.resume_step + 1

    losses = {}
    for step in range(start, args.steps + 1):
        x, y = loader.next_batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses[step] = loss.item()
        if step in args.save_at:
            manager.save(step, state)

    Path(args.out, f"losses_rank{rank}_{args.tag}.json").write_text(json.dumps(losses))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=full)
    if rank == 0:
        torch.save({"model": model_sd, "optim": optim_sd}, Path(args.out, f"final_{args.tag}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
