"""Training stall per checkpoint: synchronous DCP save vs `checkpoint.async_save` (pinned-memory staging).

    python benchmarks/bench_checkpoint_stall.py --model qwen3 --flavor 1.7B --out /tmp/ckpt_bench [--log $OUT/log]

Builds the model with bf16 weights and AdamW states (the performance issue's precision policy), takes two
optimizer steps on random tokens so the optimizer state exists, then saves the same state through
`CheckpointManager` both ways. Reported: the stall (the time `save` blocks the training loop), the whole
save (stall + the background write, for async), the size on disk, and the step time of a training step run
while the async write is in flight (what the overlap costs). One process, one device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState
from posttrain.config.sections import CheckpointSection
from posttrain.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, optimizer, batch: int, seq: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    ids = torch.randint(0, model.args.vocab_size, (batch, seq), device=device)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def _folder_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3")
    p.add_argument("--flavor", default="1.7B")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/ckpt_bench"))
    p.add_argument("--log", type=Path, default=None, help="append result lines (json) here as they come")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, float | str] = {"model": f"{args.model} {args.flavor}", "device": str(device),
                                       "torch": torch.__version__}

    def record(key: str, value: float | str) -> None:
        results[key] = value
        print(f"{key}: {value}", flush=True)
        if args.log is not None:
            with args.log.open("a") as f:
                f.write(json.dumps({key: value}) + "\n")

    model = build_model(args.model, args.flavor, device=device).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    for _ in range(2):
        step_s = _train_step(model, optimizer, args.batch, args.seq, device)
    record("train_step_s", round(step_s, 3))

    for mode in ("sync", "async"):
        out = args.out / mode
        shutil.rmtree(out, ignore_errors=True)
        manager = CheckpointManager(CheckpointSection(async_save=mode == "async", keep_last=0), out)
        state = {"model_optimizer": ModelOptimizerState(model, optimizer)}
        _sync(device)
        t0 = time.perf_counter()
        manager.save(1, state)
        stall = time.perf_counter() - t0
        record(f"{mode}_stall_s", round(stall, 2))
        if mode == "async":
            record("step_during_async_write_s", round(_train_step(model, optimizer, args.batch, args.seq, device), 3))
            manager.wait()
            record("async_total_s", round(time.perf_counter() - t0, 2))
        record(f"{mode}_size_gib", round(_folder_gib(out), 2))
        shutil.rmtree(out, ignore_errors=True)

    print("\n| model | device | train step s | sync stall s | async stall s | async total s | step during async write s | size GiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {results['model']} | {device} | {results['train_step_s']} | {results['sync_stall_s']} | "
          f"{results['async_stall_s']} | {results['async_total_s']} | {results['step_during_async_write_s']} | "
          f"{results['sync_size_gib']} |")


if __name__ == "__main__":
    main()
