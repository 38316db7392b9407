"""Where a training step's time goes: torch.profiler over a few steps, summarised as text.

`profile_steps(step, n, device)` runs `n` steps under the profiler (CPU + CUDA activities), synchronising
before and after, and returns the profiler plus the wall time. `summarize(prof, wall_s, n)` groups the
device kernels into categories by name (GEMM, attention forward / backward, loss, norm / rope / activation
elementwise, optimizer, communication, copies) and reports per step: wall time, GPU busy time (the union of
kernel intervals), idle time (wall - busy: host gaps, launches, syncs), time per category, and the top
kernels by total time. On a CPU-only run there are no device kernels; the CPU operators are ranked instead.
"""

from __future__ import annotations

import gzip
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins: order matters (a fused triton kernel that reads a matmul output is not a GEMM).
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter", re.I)),
    ("attention bwd", re.compile(r"(attention|flash|fmha|sdpa|flex).*(backward|bwd|bprop)|cutlassB|bprop|"
                                 r"dot_do_o|convert_dq", re.I)),
    ("attention fwd", re.compile(r"flash_fwd|fmha.*(cutlassF|fwd|forward)|sdpa.*(fprop|fwd)|fprop|"
                                 r"flex_attention|attention", re.I)),
    ("optimizer", re.compile(r"adam|FusedAdam|multi_tensor_apply|foreach|LpNorm|clip_grad|_amp_", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|sm90_|sm80_|matmul|_mm_|triton_tem_fused_(add)?mm|"
                        r"bmm|splitK|aten::(add)?mm$", re.I)),
    ("loss (log-softmax / CE)", re.compile(r"log_softmax|logsumexp|nll|cross_entropy|amax|_exp_sub|fused_exp", re.I)),
    ("norm (rms)", re.compile(r"rsqrt|rms|norm|pow_|mean", re.I)),
    ("activation (silu/swiglu)", re.compile(r"silu|sigmoid|swiglu|gelu", re.I)),
    ("rope / cat / neg", re.compile(r"cat|neg|rope|rotary|cos|sin", re.I)),
    ("copies / memset", re.compile(r"memcpy|memset|copy|fill|zero", re.I)),
    ("other elementwise / reduction", re.compile(r".", re.S)),
]


def category_of(kernel_name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return label
    return "other elementwise / reduction"


def profile_steps(step: Callable[[], Any], n: int, device: torch.device) -> tuple[profile, float]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        wall_s = time.perf_counter() - t0
    return prof, wall_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


GAP_BUCKETS_US = (10.0, 100.0)  # gaps under 10 us are launch spacing; 10-100 us a late launch; longer a host stall


def device_gaps(kernels: list[tuple[float, float, str]], wall_us: float, *, top: int = 8) -> dict[str, Any]:
    """Where the GPU sat idle between kernels ([start, end, name] in us): the gaps' total per size bucket, the
    largest gaps with the kernels on either side and when they fell (us after the first kernel), the gaps of 10 us
    and more summed by the pair of kernels around them (a gap that recurs at every layer shows up as one pair with
    a count, where the largest single gaps sit at the step's start), and the idle time before the first kernel
    plus after the last one (`wall_us` minus the kernels' span: the profiled window's start and end, not
    steady-state work)."""
    ordered = sorted(kernels)
    gaps: list[tuple[float, float, str, str]] = []
    end, last = float("-inf"), ""
    for start, stop, name in ordered:
        if end > float("-inf") and start > end:
            gaps.append((start - end, end - ordered[0][0], last, name))
        if stop > end:
            end, last = stop, name
    low, high = GAP_BUCKETS_US
    buckets = {f"< {low:g} us": [0.0, 0], f"{low:g}-{high:g} us": [0.0, 0], f">= {high:g} us": [0.0, 0]}
    for size, *_ in gaps:
        key = list(buckets)[0 if size < low else 1 if size < high else 2]
        buckets[key][0] += size
        buckets[key][1] += 1
    pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for size, _, after, before in gaps:
        if size >= low:
            pairs[(after, before)][0] += size
            pairs[(after, before)][1] += 1
    span = (end - ordered[0][0]) if ordered else 0.0
    return {
        "edges_us": max(wall_us - span, 0.0),
        "buckets": {k: {"us": v[0], "count": v[1]} for k, v in buckets.items()},
        "largest": [{"us": g, "at_us": at, "after": a, "before": b} for g, at, a, b in sorted(gaps, reverse=True)[:top]],
        "recurring": [{"us": v[0], "count": v[1], "after": a, "before": b}
                      for (a, b), v in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def device_activities(prof: profile, device_type: DeviceType = DeviceType.CUDA) -> list[tuple[float, float, str]]:
    """Every kernel, memset and copy the GPU ran in the profiled window, as (start us, end us, name), from the
    profiler's own (Kineto) records. `prof.events()` keeps only the device work it can tie to a CPU operator: in a
    Llama-3.2-1B step on the H200 ~110 launches a step had none (among them the aten sum that ends each of inductor's
    mix-order norm reductions), and each one missing from the summary showed up as an idle gap. `device_type`: which
    records (the CPU's for a test on a machine without a GPU). User annotations ("Optimizer.step#AdamW.step") span
    kernels on the GPU's timeline; they are not device work themselves and are left out."""
    return [(e.start_ns() / 1e3, e.end_ns() / 1e3, e.name()) for e in prof.profiler.kineto_results.events()
            if e.device_type() == device_type and not e.is_user_annotation() and "#" not in e.name()]


def summarize(prof: profile, wall_s: float, n_steps: int, *, top: int = 25) -> dict[str, Any]:
    """Per-step milliseconds: wall, busy (kernel union), idle, per category, top kernels by total time."""
    kernels = device_activities(prof)
    per_step = 1e-3 / max(n_steps, 1)  # us -> ms, per step
    wall_ms = 1000.0 * wall_s / max(n_steps, 1)
    if not kernels:  # CPU-only: rank operators by self time
        by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == DeviceType.CPU:
                by_name[e.name][0] += e.self_cpu_time_total
                by_name[e.name][1] += 1
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        return {
            "device_kernels": False, "steps": n_steps, "wall_ms": wall_ms,
            "top": [{"name": k, "ms": v[0] * per_step, "calls": v[1] / n_steps, "category": category_of(k)}
                    for k, v in ranked],
        }
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_category: dict[str, float] = defaultdict(float)
    intervals = []
    named = []
    for start, end, name in kernels:
        intervals.append((start, end))
        named.append((start, end, name))
        by_kernel[name][0] += end - start
        by_kernel[name][1] += 1
        by_category[category_of(name)] += end - start
    busy_ms = _union_us(intervals) * per_step
    kernel_ms = sum(by_category.values()) * per_step
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "device_kernels": True,
        "steps": n_steps,
        "wall_ms": wall_ms,
        "gpu_busy_ms": busy_ms,
        "idle_ms": max(wall_ms - busy_ms, 0.0),
        "kernel_sum_ms": kernel_ms,
        "kernels_per_step": len(kernels) / n_steps,
        "categories": {k: v * per_step for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top": [{"name": k, "ms": v[0] * per_step, "calls": v[1] / n_steps, "category": category_of(k)}
                for k, v in ranked],
        "gaps": device_gaps(named, wall_s * 1e6),
    }


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def render_summary(title: str, summary: dict[str, Any]) -> str:
    wall = summary["wall_ms"]
    lines = [f"## {title}: {summary['steps']} profiled steps, {wall:.1f} ms wall per step"]
    if summary["device_kernels"]:
        lines.append(
            f"GPU busy {summary['gpu_busy_ms']:.1f} ms ({100 * summary['gpu_busy_ms'] / wall:.1f}%), idle / host gaps "
            f"{summary['idle_ms']:.1f} ms, {summary['kernels_per_step']:.0f} kernels per step"
        )
        lines += ["", "| category | ms / step | % of wall |", "|---|---|---|"]
        for label, ms in summary["categories"].items():
            lines.append(f"| {label} | {ms:.2f} | {100 * ms / wall:.1f}% |")
        lines.append(f"| idle / host gaps | {summary['idle_ms']:.2f} | {100 * summary['idle_ms'] / wall:.1f}% |")
        gaps = summary.get("gaps")
        if gaps:
            n = summary["steps"]
            parts = [f"{k}: {v['us'] / 1e3 / n:.2f} ms in {v['count'] / n:.1f}" for k, v in gaps["buckets"].items()]
            lines += ["", f"idle between kernels per step: {'; '.join(parts)}; before the first / after the last kernel "
                      f"{gaps['edges_us'] / 1e3:.2f} ms in the whole window", "",
                      "| largest gaps (us) | at (ms) | after kernel | before kernel |", "|---|---|---|---|"]
            lines += [f"| {g['us']:.0f} | {g['at_us'] / 1e3:.2f} | `{_short(g['after'])}` | `{_short(g['before'])}` |"
                      for g in gaps["largest"]]
            if gaps.get("recurring"):
                lines += ["", f"| gaps >= {GAP_BUCKETS_US[0]:g} us by neighbours: ms / step | count / step | after kernel "
                          "| before kernel |", "|---|---|---|---|"]
                lines += [f"| {g['us'] / 1e3 / n:.2f} | {g['count'] / n:.1f} | `{_short(g['after'])}` | "
                          f"`{_short(g['before'])}` |" for g in gaps["recurring"]]
    else:
        lines.append("no device kernels (CPU run): CPU operators by self time")
    lines += ["", "| kernel | category | ms / step | calls / step |", "|---|---|---|---|"]
    for row in summary["top"]:
        name = row["name"] if len(row["name"]) <= 110 else row["name"][:107] + "..."
        lines.append(f"| `{name}` | {row['category']} | {row['ms']:.2f} | {row['calls']:.1f} |")
    return "\n".join(lines)


def write_profile(prof: profile, summary: dict[str, Any], title: str, out_dir: Path, stem: str,
                  *, max_trace_mib: float = 12.0) -> list[Path]:
    """`<stem>.txt` (the summary) always; `<stem>.trace.json.gz` only when it stays under max_trace_mib."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.txt"]
    written[0].write_text(render_summary(title, summary) + "\n")
    raw = out_dir / f"{stem}.trace.json"
    try:
        prof.export_chrome_trace(str(raw))
        packed = out_dir / f"{stem}.trace.json.gz"
        with raw.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        if packed.stat().st_size <= max_trace_mib * 2**20:
            written.append(packed)
        else:
            packed.unlink()
    finally:
        raw.unlink(missing_ok=True)
    return written


def record_memory_step(step: Callable[[], Any], device: torch.device, out_path: Path, *,
                       python_stacks: bool = True) -> dict[str, Any] | None:
    """One step under the CUDA allocator's history recorder; `out_path` (.pickle.gz, for pytorch.org/memory_viz)
    and a summary of what was live at the step's peak. None off CUDA. `python_stacks=False` records no frames
    (sizes and order only): torch 2.11 failed a Llama-3.1-8B step with activation checkpointing while recording
    Python stacks ("SystemError: ... returned NULL without setting an exception" in backward)."""
    if device.type != "cuda":
        return None
    _sync(device)
    # Python frames only: symbolising C++ stacks for every allocation can take minutes
    if python_stacks:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    else:
        torch.cuda.memory._record_memory_history(max_entries=200_000, context=None)
    try:
        step()
        _sync(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    import pickle

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out_path, "wb", compresslevel=6) as f:
        pickle.dump(snapshot, f)
    return {**live_at_peak(snapshot), "python_stacks": python_stacks}


def live_at_peak(snapshot: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """Replay the recorded allocations (on top of the blocks live when recording began, which the snapshot's
    segments no longer tell apart from later ones: they count as `before`) and list the largest blocks live at
    the recorded peak, by the innermost frame of the repo's code that allocated them and one by one (what a
    recording without frames can still tell), and when the peak fell (the allocation that set it: its place among
    the step's allocations and its site)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    n_allocs = peak_alloc = 0
    peak_site = "?"
    for trace in snapshot.get("device_traces", []):
        for e in trace:
            action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
            if action == "alloc":
                n_allocs += 1
                live[addr] = (size, _where(e.get("frames", [])))
                total += size
                if total > peak:
                    peak, at_peak = total, dict(live)
                    peak_alloc, peak_site = n_allocs, live[addr][1]
            elif action == "free_completed" and addr in live:
                total -= live.pop(addr)[0]
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        by_site[where][0] += size
        by_site[where][1] += 1
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]
    largest = sorted(at_peak.values(), key=lambda sw: -sw[0])[:top]
    return {
        "peak_above_start_gib": peak / 2**30,
        "at_peak": [{"where": w, "gib": s / 2**30, "blocks": n} for w, (s, n) in ranked],
        "largest_blocks": [{"mib": s / 2**20, "where": w} for s, w in largest],
        "peak_set_by": {"alloc": peak_alloc, "of": n_allocs, "where": peak_site},
    }


def _where(frames: list[dict[str, Any]]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if "posttrain/" in name or "transformers/" in name or "liger_kernel/" in name:
            return f"{name.split('site-packages/')[-1].split('wt15/')[-1]}:{f.get('line')} {f.get('name')}"
    return frames[0].get("name", "?") if frames else "?"
