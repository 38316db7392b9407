"""Packing vs padding on a length-skewed chat dataset: effective trained tokens/s through the real SFT step.

    python benchmarks/bench_packing.py --flavor 0.6B --seq-len 4096 --batch 4 --out packing.json

The dataset is synthetic: document lengths are log-normal (median `--median-len` 200 tokens, `--sigma` 1.0,
clipped to [`--min-len`, `--max-len` 4096]); token ids are random; the assistant mask covers the second half
of each document (so about half the tokens are trained). The same document stream (same seed) is fed, on
the fly, through posttrain's packer (`posttrain.datasets.packing`: `fit_to_length`, `BestFitBuffer`,
`pack_best_fit` / `pack_one`, `build_row`) in each mode:

* `padding`: the packer's padding mode, one document per `seq_len` row (the rest is padding);
* `best_fit`: best-fit packing from a buffer of `--pack-buffer` documents (posttrain's default);
* `pad_longest` (opt-in): one document per row, the batch cut to its longest row rounded up to
  `--pad-multiple` -- Hugging Face's dynamic padding. Row lengths vary, so with compile each new length
  recompiles; use it without compile or expect warmup to absorb recompiles.

One model (posttrain `Trainer`, random init, bf16 parameters and AdamW states on GPU, flex attention with
the document block mask, per-block compile on GPU) trains every mode in turn with the real
`Trainer.train_step` + `sft_loss`; packing runs inside the timed step (it is the data wait of the step).
Reported per mode over the timed steps: trained (target) tokens/s -- the effective throughput --, real
tokens/s, documents/s, padding waste (padding positions / all positions), step time, and the ratio to
`padding`. Tables are printed last after `=== RESULTS ===`; `--out` gets JSON.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

from measure import (
    RESULTS_MARKER,
    Deadline,
    environment,
    fmt,
    free_memory,
    markdown_table,
    peak_gib,
    reset_peak,
    resolve_device,
    short_error,
    synchronize,
    write_json,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from posttrain.config import config_from_dict  # noqa: E402
from posttrain.datasets.packing import (  # noqa: E402
    BestFitBuffer,
    build_row,
    fit_to_length,
    pack_best_fit,
    pack_one,
)
from posttrain.datasets.sft_format import TokenizedSample  # noqa: E402
from posttrain.models.registry import get_model_spec, resolve_args  # noqa: E402
from posttrain.trainer import Trainer  # noqa: E402

try:
    from posttrain.recipes.sft import sft_loss

    SFT_LOSS_SOURCE = "posttrain.recipes.sft.sft_loss"
except ImportError as _err:  # the recipe module imports torchdata; the loss itself does not need it
    from posttrain.losses import chunked_cross_entropy
    from posttrain.trainer import LossOutput

    SFT_LOSS_SOURCE = f"local copy of sft_loss (import failed: {_err})"

    def sft_loss(model, batch, n_global, *, chunk_size):  # same body as posttrain.recipes.sft.sft_loss
        output_fn = partial(
            chunked_cross_entropy, labels=batch["labels"], vocab_size=model.args.vocab_size, chunk_size=chunk_size
        )
        loss_sum, n_targets = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
            output_fn=output_fn,
        )
        return LossOutput(loss_sum=loss_sum, n_targets=n_targets)


MODES = ("padding", "best_fit", "pad_longest")
MIN_TIMED_STEPS = 3
PAD_ID = 0


# --------------------------------------------------------------------------------------------- data


def skewed_chat_documents(
    *, vocab: int, median_len: int, sigma: float, min_len: int, max_len: int, seed: int
) -> Iterator[TokenizedSample]:
    """Endless documents with log-normal lengths; the assistant mask is the second half of each."""
    rng = np.random.default_rng(seed)
    mu = math.log(median_len)
    i = 0
    while True:
        n = int(np.clip(round(rng.lognormal(mu, sigma)), min_len, max_len))
        ids = rng.integers(0, vocab, size=n, dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        mask[n // 2:] = True
        yield TokenizedSample(ids, mask, f"synthetic:{i}")
        i += 1


def length_summary(median_len: int, sigma: float, min_len: int, max_len: int, seed: int, n: int = 20000) -> dict:
    rng = np.random.default_rng(seed + 1)
    lengths = np.clip(np.round(rng.lognormal(math.log(median_len), sigma, size=n)), min_len, max_len)
    return {
        "median": float(np.median(lengths)), "mean": float(lengths.mean()),
        "p90": float(np.percentile(lengths, 90)), "p99": float(np.percentile(lengths, 99)),
        "max": float(lengths.max()), "share_at_max": float((lengths >= max_len).mean()),
    }


@dataclass
class BatchStats:
    rows: int
    positions: int  # all positions computed (rows x row length)
    tokens: int  # real tokens
    targets: int  # trained tokens
    documents: int


@dataclass
class PackedBatches:
    """Micro-batches from posttrain's packer, built on the fly in `__next__` (inside the timed step)."""

    documents: Iterator[TokenizedSample]
    mode: str
    seq_len: int
    batch: int
    pack_buffer: int
    pad_multiple: int
    stats: list[BatchStats] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        self.buffer = BestFitBuffer(self.pack_buffer if self.mode == "best_fit" else 1)

    def _refill(self) -> None:  # ShardPipeline._refill / next_sample, minus reading and tokenizing
        while not self.buffer.is_full():
            fitted, outcome = fit_to_length(next(self.documents), self.seq_len, "truncate")
            if fitted is None:
                self.dropped += 1
                continue
            self.truncated += outcome == "truncated"
            self.buffer.add(fitted)

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch):
            if self.mode == "best_fit":
                docs = pack_best_fit(self.buffer, self._refill, self.seq_len)
            else:
                docs = pack_one(self.buffer, self._refill)
            rows.append(build_row(docs, self.seq_len, PAD_ID))
        length = self.seq_len
        if self.mode == "pad_longest":
            longest = max(r.num_tokens for r in rows)
            length = min(self.seq_len, math.ceil(longest / self.pad_multiple) * self.pad_multiple)
        out = {
            "input_ids": np.stack([r.input_ids[:length] for r in rows]),
            "labels": np.stack([r.labels[:length] for r in rows]),
            "position_ids": np.stack([r.position_ids[:length] for r in rows]),
            "document_ids": np.stack([r.document_ids[:length] for r in rows]),
        }
        self.stats.append(BatchStats(
            rows=len(rows),
            positions=len(rows) * length,
            tokens=sum(r.num_tokens for r in rows),
            targets=sum(r.num_targets for r in rows),
            documents=sum(r.num_documents for r in rows),
        ))
        pin = torch.cuda.is_available()
        return {k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)) for k, v in out.items()}


class Feeder:
    """The Trainer's data_loader: iterating it reads from whichever mode's stream is plugged in."""

    def __init__(self) -> None:
        self.source: PackedBatches | None = None

    def __iter__(self) -> "Feeder":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self.source)


class VocabOnlyTokenizer:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pad_id = PAD_ID
        self.eos_id = PAD_ID


# --------------------------------------------------------------------------------------------- run


def build_trainer(args: argparse.Namespace, device: torch.device, output_dir: str) -> Trainer:
    cuda = device.type == "cuda"
    compile_on = {"auto": cuda, "on": True, "off": False}[args.compile]
    backend = args.attn_backend if args.attn_backend != "auto" else ("flex" if cuda else "sdpa")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    cfg = config_from_dict({
        "job": {"output_dir": output_dir, "seed": args.seed},
        "model": {"name": args.model, "flavor": args.flavor, "attn_backend": backend, "dtype": dtype},
        "training": {
            "steps": 1_000_000, "seq_len": args.seq_len, "batch_size": args.batch, "micro_batch_size": args.batch,
            "device": device.type, "mixed_precision": "bf16" if cuda else "fp32",
            "loss_chunk_size": args.loss_chunk_size,
        },
        "optimizer": {"lr": 1e-5, "fused": "auto"},
        "lr_scheduler": {"warmup_steps": 0, "decay": "constant"},
        "activation_checkpoint": {"mode": args.ac},
        "compile": {"enabled": compile_on},
        "checkpoint": {"resume": False, "save_final": False},
        "metrics": {"tensorboard": False, "log_freq": 1_000_000},
    }, source="bench_packing")
    spec = get_model_spec(args.model)
    vocab = resolve_args(spec, args.flavor).vocab_size
    return Trainer(cfg, tokenizer=VocabOnlyTokenizer(vocab))


def run_mode(mode: str, trainer: Trainer, feeder: Feeder, args: argparse.Namespace, deadline: Deadline,
             device: torch.device) -> dict[str, Any]:
    docs = skewed_chat_documents(vocab=trainer.model_args.vocab_size, median_len=args.median_len, sigma=args.sigma,
                                 min_len=args.min_len, max_len=args.max_len, seed=args.seed)
    stream = PackedBatches(docs, mode, args.seq_len, args.batch, args.pack_buffer, args.pad_multiple)
    feeder.source = stream
    loss_fn = partial(sft_loss, chunk_size=args.loss_chunk_size)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        trainer.train_step(loss_fn)
        if deadline.expired() and i >= 1:
            break
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    reset_peak(device)
    first = len(stream.stats)
    records = []
    t1 = time.perf_counter()
    for _ in range(args.steps):
        records.append(trainer.train_step(loss_fn))
        if deadline.expired() and len(records) >= MIN_TIMED_STEPS:
            break
    synchronize(device)
    elapsed = time.perf_counter() - t1
    window = stream.stats[first:first + len(records)]
    positions = sum(b.positions for b in window)
    tokens = sum(b.tokens for b in window)
    targets = sum(b.targets for b in window)
    documents = sum(b.documents for b in window)
    return {
        "status": "ok",
        "timed_steps": len(records),
        "warmup_s": round(warmup_s, 2),
        "step_ms": 1000 * elapsed / len(records),
        "trained_tokens_per_s": targets / elapsed,
        "real_tokens_per_s": tokens / elapsed,
        "documents_per_s": documents / elapsed,
        "positions_per_s": positions / elapsed,
        "padding_waste": 1 - tokens / positions if positions else None,
        "docs_per_row": documents / sum(b.rows for b in window),
        "data_wait_ms": 1000 * sum(r.get("data_wait_s", 0.0) for r in records) / len(records),
        "peak_mem_gib": peak_gib(device),
        "loss_last": records[-1].get("loss"),
        "truncated_docs": stream.truncated,
    }


def render(results: list[dict[str, Any]], args: argparse.Namespace, lengths: dict, device: torch.device) -> str:
    base = next((r for r in results if r["name"] == "padding" and r["status"] == "ok"), None)
    lines = [
        f"### Packing vs padding: {args.model} {args.flavor}, seq {args.seq_len} x batch {args.batch}, device {device}; "
        f"document lengths log-normal median {lengths['median']:.0f}, mean {lengths['mean']:.0f}, "
        f"p99 {lengths['p99']:.0f}, max {lengths['max']:.0f} (assistant mask = second half)",
        "",
    ]
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        ratio = r["trained_tokens_per_s"] / base["trained_tokens_per_s"] if ok and base else None
        rows.append([
            r["name"], fmt(r.get("trained_tokens_per_s"), ",.0f"), fmt(r.get("real_tokens_per_s"), ",.0f"),
            fmt(r.get("documents_per_s"), ",.1f"),
            fmt(100 * r["padding_waste"] if ok and r.get("padding_waste") is not None else None),
            fmt(r.get("docs_per_row"), ".2f"), fmt(r.get("step_ms")), fmt(r.get("data_wait_ms"), ".2f"),
            fmt(r.get("peak_mem_gib")), "-" if ratio is None else f"{ratio:.2f}x",
            "ok" if ok else f"{r['status']}: {r.get('reason', '')}",
        ])
    lines.append(markdown_table(
        ["mode", "trained tokens/s", "real tokens/s", "docs/s", "padding waste %", "docs/row", "step ms",
         "data wait ms", "peak mem GiB", "trained tokens/s vs padding", "status"], rows))
    best = next((r for r in results if r["name"] == "best_fit" and r["status"] == "ok"), None)
    if best and base:
        q = best["trained_tokens_per_s"] / base["trained_tokens_per_s"]
        lines += ["", f"- target packing >= 3x padding (effective trained tokens/s): {q:.2f}x {'MET' if q >= 3 else 'not met'}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3")
    p.add_argument("--flavor", default=None, help="default: 0.6B on CUDA, debug on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="parameters and AdamW states (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "flex", "sdpa"))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="per-block compile (auto: on CUDA)")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective", "op"))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default="padding,best_fit", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--median-len", type=int, default=200)
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of document lengths")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--pack-buffer", type=int, default=64)
    p.add_argument("--pad-multiple", type=int, default=512, help="pad_longest: round the batch length up to this")
    p.add_argument("--loss-chunk-size", type=int, default=4096)
    p.add_argument("--time-budget-s", type=float, default=150.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    deadline = Deadline(args.time_budget_s)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.flavor is None:
        args.flavor = "0.6B" if device.type == "cuda" else "debug"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {MODES}")
    lengths = length_summary(args.median_len, args.sigma, args.min_len, min(args.max_len, args.seq_len), args.seed)
    report: dict[str, Any] = {
        "benchmark": "bench_packing", "env": environment(device), "settings": vars(args), "lengths": lengths,
        "sft_loss": SFT_LOSS_SOURCE, "results": [],
    }
    print(f"document lengths: {lengths}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
        trainer = None
        try:
            trainer = build_trainer(args, device, tmp)
        except (Exception, SystemExit) as err:  # noqa: BLE001
            reason = short_error(err)
            print(f"building the model failed: {reason}\n{traceback.format_exc(limit=8)}", flush=True)
            report["results"] = [{"name": m, "status": "failed", "reason": f"build: {reason}"} for m in modes]
        if trainer is not None:
            feeder = Feeder()
            trainer.set_data_loader(feeder)
            for mode in modes:
                entry: dict[str, Any] = {"name": mode}
                if deadline.remaining() < 10:
                    entry.update(status="skipped", reason="time budget spent")
                else:
                    print(f"[{mode}] running ({deadline.remaining():.0f} s of budget left)", flush=True)
                    try:
                        entry.update(run_mode(mode, trainer, feeder, args, deadline, device))
                        print(f"[{mode}] {entry['trained_tokens_per_s']:,.0f} trained tokens/s, padding waste "
                              f"{100 * entry['padding_waste']:.1f}%", flush=True)
                    except (Exception, SystemExit) as err:  # noqa: BLE001
                        entry.update(status="failed", reason=short_error(err))
                        print(f"[{mode}] failed: {entry['reason']}\n{traceback.format_exc(limit=8)}", flush=True)
                        del err
                    free_memory(device, reset_compiler=False)
                report["results"].append(entry)
                write_json(args.out, report)
            trainer.close()
    report["total_s"] = round(deadline.elapsed(), 1)
    write_json(args.out, report)
    print(f"\n{RESULTS_MARKER} bench_packing ({report['total_s']} s)")
    print(render(report["results"], args, lengths, device), flush=True)
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
