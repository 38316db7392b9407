"""MoE training throughput: the experts as one ``torch._grouped_mm`` per projection against a loop of plain
matmuls over the experts (posttrain.models.common.moe, ``EXPERTS_PATH``), full training and expert LoRA.

    python benchmarks/bench_moe.py --shapes qwen3_moe:30B-A3B:8,gpt_oss:20b:4 --seq-len 4096 --batch 1 \
        --steps 5 --warmup 2 --time-budget-s 140 --out moe.json

A shape is ``family:flavor:n_layers``: the flavor's real widths (Qwen3-30B-A3B: 128 experts top-8, 768 wide;
gpt-oss-20b: 32 experts top-4, 2880 wide, biases, clamped SwiGLU) cut to n_layers so it fits one GPU with
bf16 weights and gradients. Weights are random (the flavor's init), so the router spreads tokens about evenly.

The unit measured is one training step of the WHOLE model without the optimizer: forward of random token ids
(embeddings, attention, every MoE layer, the final norm) and the fused linear cross-entropy head, then
backward; parameters in bf16, eager (no compile). Attention and the head are the same on both paths, so the
ratio grouped / loop understates the MoE layers' own speed-up. With ``lora`` (``--lora``) the experts get
rank-16 adapters (``lora.targets = ["experts"]``) and everything else is frozen: gradients flow to the
adapters (and, through the activations, the whole backward still runs).

Per run, after warmup: tokens/s (B x S per step / wall time, synchronised), peak allocated memory over the
timed steps. Runs that fail (OOM) or no longer fit the budget are rows saying so. The table comes last.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import measure  # also puts the repository first on sys.path

import torch  # noqa: E402

from posttrain.losses.fused_cross_entropy import fused_linear_cross_entropy  # noqa: E402
from posttrain.models import build_model, get_model_spec  # noqa: E402
from posttrain.models.common import moe  # noqa: E402
from posttrain.models.common.lora import apply_lora  # noqa: E402
from posttrain.models.registry import resolve_args  # noqa: E402

PATHS = ("grouped", "loop")
LORA_RANK = 16


@dataclass
class Shape:
    family: str
    flavor: str
    n_layers: int

    @property
    def name(self) -> str:
        return f"{self.family} {self.flavor} x{self.n_layers} layers"


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise SystemExit(f"--shapes: {item!r} is not family:flavor:n_layers (e.g. qwen3_moe:30B-A3B:8)")
        family, flavor = parts[0], parts[1]
        spec = get_model_spec(family)
        if flavor not in spec.flavors:
            raise SystemExit(f"--shapes: {family} has no flavor {flavor!r}; choose one of {sorted(spec.flavors)}")
        if not hasattr(spec.flavors[flavor], "n_experts"):
            raise SystemExit(f"--shapes: {family} is not a mixture-of-experts family")
        shapes.append(Shape(family, flavor, int(parts[2])))
    return shapes


def build(shape: Shape, device: torch.device, dtype: torch.dtype, attn_backend: str) -> torch.nn.Module:
    spec = get_model_spec(shape.family)
    overrides: dict[str, Any] = {"n_layers": shape.n_layers, "attn_backend": attn_backend}
    if hasattr(spec.flavors[shape.flavor], "layer_types"):
        overrides["layer_types"] = None  # re-derived for the cut depth (GPT-OSS alternates sliding / full)
    args = resolve_args(spec, shape.flavor, **overrides)
    with torch.device(device):
        model = build_model(shape.family, args, device=device)
    return model.to(dtype).train()


def train_step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    vocab = model.args.vocab_size
    loss_sum, n = model(ids, output_fn=lambda h, w: fused_linear_cross_entropy(h, w, labels, vocab_size=vocab))
    (loss_sum / n).backward()
    for p in model.parameters():
        p.grad = None


def measure_run(model, path: str, s: argparse.Namespace, device: torch.device, deadline: measure.Deadline,
                per_run_s: float) -> dict[str, Any]:
    moe.EXPERTS_PATH = path
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (s.batch, s.seq_len), generator=gen).to(device)
    labels = torch.roll(ids, -1, dims=1)
    run_end = time.perf_counter() + min(per_run_s, deadline.remaining())
    warm = 0
    for _ in range(s.warmup):
        train_step(model, ids, labels)
        warm += 1
        if time.perf_counter() > run_end:
            break
    measure.synchronize(device)
    measure.reset_peak(device)
    steps, start = 0, time.perf_counter()
    while steps < s.steps and (steps == 0 or time.perf_counter() < run_end):
        train_step(model, ids, labels)
        steps += 1
        measure.synchronize(device)
    seconds = time.perf_counter() - start
    return {"warmup_steps": warm, "timed_steps": steps, "step_s": seconds / steps,
            "tokens_per_s": steps * s.batch * s.seq_len / seconds, "peak_gib": measure.peak_gib(device)}


def run_shape(shape: Shape, s: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              deadline: measure.Deadline, results: list[dict[str, Any]], runs_left: int) -> None:
    attn = s.attn_backend
    base = {"shape": shape.name, "seq_len": s.seq_len, "batch": s.batch, "attn_backend": attn}
    try:
        model = build(shape, device, dtype, attn)
    except Exception as err:  # noqa: BLE001 - one failed shape must not stop the others
        for lora in s.lora:
            for path in PATHS:
                status = f"failed: {measure.short_error(err)}"
                results.append({**base, "lora": lora, "path": path, "status": status})
        return
    base["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    for lora in s.lora:
        if lora == "experts":
            apply_lora(model, rank=LORA_RANK, alpha=2 * LORA_RANK, targets=("experts",))
        for path in PATHS:
            row = {**base, "lora": lora, "path": path}
            if deadline.remaining() < 1:
                results.append({**row, "status": "skipped: time budget spent"})
            else:
                try:
                    row.update(measure_run(model, path, s, device, deadline, deadline.remaining() / runs_left),
                               status="ok")
                except Exception as err:  # noqa: BLE001
                    row["status"] = f"failed: {measure.short_error(err)}"
                    measure.free_memory(device)
                results.append(row)
            runs_left -= 1
            measure.write_json(s.out, {"environment": measure.environment(device), "results": results})
    moe.EXPERTS_PATH = "auto"
    del model
    measure.free_memory(device)


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    by_key = {(r["shape"], r["lora"], r["path"]): r for r in results}
    for r in results:
        loop = by_key.get((r["shape"], r["lora"], "loop"), {})
        speedup = (r["tokens_per_s"] / loop["tokens_per_s"]
                   if r["path"] == "grouped" and r.get("tokens_per_s") and loop.get("tokens_per_s") else None)
        fmt = measure.fmt
        rows.append([r["shape"], fmt(r.get("params_b"), ".2f"), f"{r['batch']}x{r['seq_len']}", r["lora"],
                     r["path"], fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("step_s"), ".3f"),
                     fmt(r.get("peak_gib"), ".1f"), fmt(speedup, ".2f"),
                     r["status"] if r["status"] != "ok" else f"ok ({r['timed_steps']} steps)"])
    headers = ["shape", "params (B)", "B x S", "lora", "experts path", "tokens/s", "step s", "peak GiB",
               "grouped / loop", "status"]
    return measure.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3_moe:30B-A3B:8,gpt_oss:20b:4",
                        help="comma-separated family:flavor:n_layers")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (at least one)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora", default="off,experts", help="comma-separated: off, experts")
    parser.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flex"],
                        help="sdpa: no compile time in the budget (GPT-OSS's sinks then form explicit scores)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="float32 for CPU smoke runs (torch._grouped_mm on the CPU takes no bf16)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-budget-s", type=float, default=140.0)
    parser.add_argument("--out", help="JSON with every number and the environment")
    s = parser.parse_args(argv)
    s.lora = [x for x in s.lora.split(",") if x]
    if not s.lora or set(s.lora) - {"off", "experts"}:
        parser.error(f"--lora {','.join(s.lora)!r}: use off, experts or both")
    if s.lora == ["experts", "off"]:
        parser.error("--lora: off must come first (the adapters stay on the model once applied)")
    if s.steps < 1 or s.seq_len < 2 or s.batch < 1:
        parser.error("--steps, --batch must be >= 1 and --seq-len >= 2")
    shapes = parse_shapes(s.shapes)
    device = measure.resolve_device(s.device)
    deadline = measure.Deadline(s.time_budget_s)
    results: list[dict[str, Any]] = []
    runs_per_shape = len(s.lora) * len(PATHS)
    for i, shape in enumerate(shapes):
        run_shape(shape, s, device, getattr(torch, s.dtype), deadline, results,
                  runs_left=runs_per_shape * (len(shapes) - i))
    measure.write_json(s.out, {"environment": measure.environment(device), "results": results})
    print(measure.RESULTS_MARKER)
    print(f"### MoE training step (forward + backward of the whole model, eager, {s.dtype}), "
          f"{measure.environment(device).get('gpu') or 'cpu'}, torch {torch.__version__}")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
