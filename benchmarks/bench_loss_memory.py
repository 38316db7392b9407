"""Peak memory and time of the LM loss + backward: naive logits + cross-entropy vs posttrain's chunked CE,
and the effect of padding the vocabulary to a multiple of 64 on the output projection's matmul time.

    python benchmarks/bench_loss_memory.py --tokens 16384 --hidden 2048 --vocabs 151936,262144 --out loss.json

For each vocabulary size V the inputs are the final hidden states h [T, D] and the output weight W [V, D]
(both `--dtype`, default bf16, both requiring grad) and random labels; each method computes the summed
loss over all T tokens divided by T, then backward, filling h.grad and W.grad:

* `naive_fp32`: logits = h @ W.T, F.cross_entropy(logits.float()) -- what HF's loss does (upcast logits);
* `naive_bf16`: F.cross_entropy on the bf16 logits directly;
* `naive_compile`: `naive_fp32` under torch.compile (what HF + torch.compile gets);
* `chunked:<C>`: posttrain.losses.chunked_cross_entropy with chunk_size C (gradients computed chunk by
  chunk inside forward, the [T, V] logits never exist);
* `recompute:<C>`: posttrain.losses.token_log_probs (each chunk checkpointed, recomputed in backward);
* `fused:<C>`: posttrain.losses.fused_linear_cross_entropy (C = 0: its automatic chunk size); gradients made
  in forward, one bf16 chunk of logits turned into its gradient in place by compiled math, the head's
  gradient accumulated in bf16; `fused_eager:<C>` is the same with the chunk math not compiled; `fused_l2:<C>:<K>`
  runs the Triton CE-gradient kernel as K programs per SM re-reading rows from L2 (`ce_grad_kernel.L2_PROGRAMS_PER_SM`);
* `liger`: Liger's LigerFusedLinearCrossEntropyLoss, when `import liger_kernel` works.

Peak extra memory = max_memory_allocated during one loss + backward minus what was allocated before (the
inputs). It includes h.grad and W.grad themselves (the column "beyond grads" subtracts them). Time = mean
over `--iters` timed iterations after `--warmup`, cuda-synchronized. Gradient error: ||g - g_ref|| / ||g_ref||
for h.grad and W.grad against `naive_fp32`'s (run it first). The padding table times the three
output-projection matmuls (h @ W.T forward, g @ W and g.T @ h backward) for V and for V rounded up to a
multiple of 64 (`--pad-vocabs`, e.g. 151669 -> 151680, 128257 -> 128320). Tables are printed last after
`=== RESULTS ===`; `--out` gets JSON.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from typing import Any, Callable

from measure import (
    RESULTS_MARKER,
    Deadline,
    allocated_gib,
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from posttrain.losses import chunked_cross_entropy, fused_linear_cross_entropy, token_log_probs  # noqa: E402
from posttrain.losses import ce_grad_kernel, logit_math  # noqa: E402

PAD_MULTIPLE = 64
GIB = 2**30


# --------------------------------------------------------------------------------------------- methods


def naive_fp32(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = h @ w.T
    return F.cross_entropy(logits.float(), labels, reduction="sum") / labels.numel()


def naive_bf16(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = h @ w.T
    return F.cross_entropy(logits, labels, reduction="sum").float() / labels.numel()


def chunked(chunk: int) -> Callable[..., torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, n = chunked_cross_entropy(h, w, labels, vocab_size=w.shape[0], chunk_size=chunk)
        return loss_sum / labels.numel()

    return loss


def fused(chunk: int, compiled: bool = True, l2_programs_per_sm: int = 0) -> Callable[..., torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logit_math.compile_on_cuda = compiled
        try:
            with ce_grad_kernel.l2_programs_per_sm(l2_programs_per_sm):
                loss_sum, n = fused_linear_cross_entropy(h, w, labels, vocab_size=w.shape[0], chunk_size=chunk)
        finally:
            logit_math.compile_on_cuda = True
        return loss_sum / labels.numel()

    return loss


def recompute(chunk: int) -> Callable[..., torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -token_log_probs(h, w, labels, vocab_size=w.shape[0], chunk_size=chunk).sum() / labels.numel()

    return loss


def liger() -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = fn(w, h, labels)
        if isinstance(out, tuple):  # versions that can also return a z-loss
            out = out[0]
        return getattr(out, "loss", out).float() / labels.numel()

    return loss


def make_method(name: str) -> Callable[..., torch.Tensor]:
    if name == "naive_fp32":
        return naive_fp32
    if name == "naive_bf16":
        return naive_bf16
    if name == "naive_compile":
        return torch.compile(naive_fp32)
    if name.startswith("chunked:"):
        return chunked(int(name.split(":", 1)[1]))
    if name.startswith("fused:"):
        return fused(int(name.split(":", 1)[1]))
    if name.startswith("fused_l2:"):  # fused_l2:C:K
        chunk, per_sm = name.split(":")[1:3]
        return fused(int(chunk), l2_programs_per_sm=int(per_sm))
    if name.startswith("fused_eager:"):
        return fused(int(name.split(":", 1)[1]), compiled=False)
    if name.startswith("recompute:"):
        return recompute(int(name.split(":", 1)[1]))
    if name == "liger":
        return liger()
    raise SystemExit(f"unknown method {name!r}; use naive_fp32, naive_bf16, naive_compile, chunked:C, fused:C, "
                     "fused_eager:C, fused_l2:C:K, recompute:C, liger")


# --------------------------------------------------------------------------------------------- measuring


def make_inputs(vocab: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """h [T, D] (std 1, like a normed hidden state), W [V, D] (std 0.02), labels [T]; made on the device."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    h = torch.randn(args.tokens, args.hidden, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, args.hidden, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (args.tokens,), generator=g, device=device)
    return h, w, labels


def _rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float | None:
    if got is None or want is None:
        return None
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def measure_loss(name: str, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
                 device: torch.device, ref_grads: dict | None = None) -> dict:
    """`ref_grads`: `{"h": ..., "w": ...}` to compare with; an empty dict is filled with this method's grads."""
    fn = make_method(name)

    def once() -> torch.Tensor:
        h.grad = None
        w.grad = None
        loss = fn(h, w, labels)
        loss.backward()
        return loss.detach()

    try:
        # memory: one warm call first (kernels, compile, cuBLAS workspaces), then a measured call
        once()
        grad_err = {}
        if ref_grads is not None and not ref_grads:
            ref_grads.update(h=h.grad.detach().clone(), w=w.grad.detach().clone())
        elif ref_grads:
            grad_err = {"grad_h_rel_err": _rel_err(h.grad, ref_grads["h"]),
                        "grad_w_rel_err": _rel_err(w.grad, ref_grads["w"])}
        h.grad = w.grad = None
        gc.collect()
        synchronize(device)
        base = allocated_gib(device)
        reset_peak(device)
        loss = once()
        synchronize(device)
        peak = peak_gib(device)
        for _ in range(max(args.warmup - 1, 0)):
            once()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            loss = once()
        synchronize(device)
        ms = 1000 * (time.perf_counter() - t0) / args.iters
        grads_gib = (h.numel() * h.element_size() + w.numel() * w.element_size()) / GIB
        extra = peak - base if peak is not None and base is not None else None
        return {
            "status": "ok", "ms": ms, "loss": float(loss),
            "peak_extra_gib": extra,
            "extra_beyond_grads_gib": extra - grads_gib if extra is not None else None,
            "grads_gib": grads_gib, **grad_err,
        }
    finally:
        h.grad = w.grad = None
        del fn


def time_projection(vocab: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Forward h @ W.T and the two backward matmuls of the output projection, separately and in total."""
    h = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, args.hidden, device=device, dtype=dtype)
    grad = torch.randn(args.tokens, vocab, device=device, dtype=dtype)
    ops = {
        "fwd_ms": lambda: h @ w.T,  # [T, V]
        "bwd_input_ms": lambda: grad @ w,  # [T, D]
        "bwd_weight_ms": lambda: grad.T @ h,  # [V, D]
    }
    out: dict[str, Any] = {"vocab": vocab, "multiple_of_64": vocab % PAD_MULTIPLE == 0}
    try:
        for key, op in ops.items():
            for _ in range(args.warmup):
                op()
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                op()
            synchronize(device)
            out[key] = 1000 * (time.perf_counter() - t0) / args.iters
        out["total_ms"] = out["fwd_ms"] + out["bwd_input_ms"] + out["bwd_weight_ms"]
        flops = 3 * 2 * args.tokens * args.hidden * vocab
        out["tflops"] = flops / (out["total_ms"] / 1000) / 1e12
        out["status"] = "ok"
        return out
    finally:
        del h, w, grad


# --------------------------------------------------------------------------------------------- report


def render(loss_rows: list[dict], pad_rows: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    lines = [f"### Loss + backward: {args.tokens} tokens, hidden {args.hidden}, {args.dtype}, device {device}", ""]
    table = []
    for r in loss_rows:
        ref = next((x for x in loss_rows if x["vocab"] == r["vocab"] and x["method"] == "naive_fp32"
                    and x["status"] == "ok"), None)
        ok = r["status"] == "ok"
        rel = abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) if ok and ref else None
        speed = ref["ms"] / r["ms"] if ok and ref and r["ms"] else None
        table.append([
            f"{r['vocab']:,}", r["method"], fmt(r.get("peak_extra_gib"), ".2f"), fmt(r.get("extra_beyond_grads_gib"), ".2f"),
            fmt(r.get("ms")), "-" if speed is None else f"{speed:.2f}x", fmt(rel, ".1e"),
            fmt(r.get("grad_h_rel_err"), ".1e"), fmt(r.get("grad_w_rel_err"), ".1e"),
            "ok" if ok else f"{r['status']}: {r.get('reason', '')}",
        ])
    lines.append(markdown_table(
        ["vocab", "method", "peak extra GiB", "beyond grads GiB", "fwd+bwd ms", "speed vs naive_fp32",
         "loss rel diff", "h.grad rel err", "W.grad rel err", "status"], table))
    for vocab in sorted({r["vocab"] for r in loss_rows}):
        ok = {r["method"]: r for r in loss_rows if r["vocab"] == vocab and r["status"] == "ok"}
        n = ok.get("naive_fp32")
        for method in (args.target_method, "liger"):
            t = ok.get(method)
            if t is None or n is None or t.get("peak_extra_gib") is None:
                continue
            lines += [f"- vocab {vocab:,}, {method}: extra memory <= 1 GiB: {t['peak_extra_gib']:.2f} GiB "
                      f"{'MET' if t['peak_extra_gib'] <= 1 else 'not met'} (beyond the two grads: "
                      f"{t['extra_beyond_grads_gib']:.2f} GiB); no slower than naive: {t['ms']:.1f} vs {n['ms']:.1f} ms "
                      f"{'MET' if t['ms'] <= n['ms'] else 'not met'}"]
    if pad_rows:
        lines += ["", "Output projection h @ W.T fwd + both bwd matmuls, vocab as is vs padded to a multiple of 64:", ""]
        lines.append(markdown_table(
            ["vocab", "multiple of 64", "fwd ms", "bwd input ms", "bwd weight ms", "total ms", "TFLOP/s", "status"],
            [[f"{r['vocab']:,}", "yes" if r["multiple_of_64"] else "no", fmt(r.get("fwd_ms"), ".2f"),
              fmt(r.get("bwd_input_ms"), ".2f"), fmt(r.get("bwd_weight_ms"), ".2f"), fmt(r.get("total_ms"), ".2f"),
              fmt(r.get("tflops")), "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"]
             for r in pad_rows]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocabs", default="151936,262144")
    p.add_argument("--chunk-sizes", default="1024,2048,4096,8192", help="chunked CE chunk sizes")
    p.add_argument("--target-method", default="fused:0", help="the method the 1 GiB / no-slower targets are checked on")
    p.add_argument("--methods", default="auto",
                   help="comma-separated (naive_fp32, naive_bf16, naive_compile, chunked:C, fused:C, fused_eager:C, "
                        "fused_l2:C:K, recompute:C, liger); auto: naive_fp32, naive_bf16, chunked:<each chunk size>, fused:0, "
                        "recompute:4096, and on CUDA "
                        "liger (when importable) and naive_compile")
    p.add_argument("--pad-vocabs", default="151669,128257,151936",
                   help="vocab sizes timed as is and padded to a multiple of 64 ('' to skip)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--time-budget-s", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def default_methods(args: argparse.Namespace, device: torch.device) -> list[str]:
    methods = ["naive_fp32", "naive_bf16"]
    methods += [f"chunked:{c}" for c in args.chunk_sizes.split(",") if c.strip()]
    methods += ["fused:0", "recompute:4096"]
    if device.type == "cuda":
        try:
            import liger_kernel  # noqa: F401

            methods.append("liger")
        except ImportError:
            pass
        methods.append("naive_compile")  # last: its compile time is what a tight budget cuts first
    return methods


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.time_budget_s)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    methods = default_methods(args, device) if args.methods == "auto" else [m.strip() for m in args.methods.split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",") if v.strip()]
    report: dict[str, Any] = {"benchmark": "bench_loss_memory", "env": environment(device), "settings": vars(args),
                              "loss": [], "vocab_padding": []}
    for vocab in vocabs:
        try:
            inputs = make_inputs(vocab, args, device, dtype)
        except Exception as err:  # noqa: BLE001
            reason = short_error(err)
            del err
            report["loss"] += [{"vocab": vocab, "method": m, "status": "failed", "reason": f"inputs: {reason}"}
                               for m in methods]
            free_memory(device, reset_compiler=False)
            continue
        ref_grads: dict = {}  # naive_fp32's h.grad / W.grad, compared with every method after it
        for method in methods:
            entry: dict[str, Any] = {"vocab": vocab, "method": method}
            need_s = 45 if method == "naive_compile" else 10  # compilation cannot be cut short
            if deadline.remaining() < need_s:
                entry.update(status="skipped", reason=f"time budget: {deadline.remaining():.0f} s left, needs ~{need_s} s")
            else:
                try:
                    ref = ref_grads if method == "naive_fp32" or ref_grads else None
                    entry.update(measure_loss(method, *inputs, args, device, ref))
                    print(f"[V={vocab} {method}] {fmt(entry['ms'])} ms, peak extra "
                          f"{fmt(entry['peak_extra_gib'], '.2f')} GiB, loss {entry['loss']:.4f}", flush=True)
                except (Exception, SystemExit) as err:  # noqa: BLE001
                    entry.update(status="failed", reason=short_error(err))
                    print(f"[V={vocab} {method}] failed: {entry['reason']}\n{traceback.format_exc(limit=6)}", flush=True)
                    del err
                free_memory(device, reset_compiler=method == "naive_compile")
            report["loss"].append(entry)
            write_json(args.out, report)
        del inputs, ref_grads
        free_memory(device, reset_compiler=False)
    pad_vocabs: list[int] = []
    for v in [int(x) for x in args.pad_vocabs.split(",") if x.strip()]:
        for x in (v, math.ceil(v / PAD_MULTIPLE) * PAD_MULTIPLE):
            if x not in pad_vocabs:
                pad_vocabs.append(x)
    for vocab in pad_vocabs:
        entry = {"vocab": vocab, "multiple_of_64": vocab % PAD_MULTIPLE == 0}
        if deadline.remaining() < 5:
            entry.update(status="skipped", reason="time budget spent")
        else:
            try:
                entry.update(time_projection(vocab, args, device, dtype))
                print(f"[projection V={vocab}] {entry['total_ms']:.2f} ms, {entry['tflops']:.0f} TFLOP/s", flush=True)
            except (Exception, SystemExit) as err:  # noqa: BLE001
                entry.update(status="failed", reason=short_error(err))
                print(f"[projection V={vocab}] failed: {entry['reason']}", flush=True)
                del err
            free_memory(device, reset_compiler=False)
        report["vocab_padding"].append(entry)
        write_json(args.out, report)
    report["total_s"] = round(deadline.elapsed(), 1)
    write_json(args.out, report)
    print(f"\n{RESULTS_MARKER} bench_loss_memory ({report['total_s']} s)")
    print(render(report["loss"], report["vocab_padding"], args, device), flush=True)
    return 0 if any(r["status"] == "ok" for r in report["loss"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
