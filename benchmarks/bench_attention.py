"""Causal GQA attention, forward + backward, per SDPA kernel: which kernel `model.sdpa_kernel` should pick.

    python benchmarks/bench_attention.py --out attention.json

For each shape (batch, heads, kv heads, positions, head size; defaults: the attention of Llama-3.2-1B at 8192,
Qwen3-1.7B at 4096 x 2 and Llama-3.1-8B at 4096 x 2) and each kernel in `--kernels` (keys of
`attention.SDPA_KERNELS`: auto = torch's own pick, cudnn, flash, efficient, fa4), the bf16 forward and backward of
`F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` are timed (`--iters` after `--warmup`, CUDA
events around the loop) and their TFLOP/s computed from the causal FLOPs (forward 2 x 2 x B x H x S^2 / 2 x D, backward
2.5x that). The output and the input gradients are compared with the first kernel's (max abs difference relative to
its largest entry). fa4 switches the process's flash kernels to FlashAttention-4 for good, so it always runs last.
A kernel that cannot take a shape prints `failed: <reason>` and the rest still run.
"""

from __future__ import annotations

import argparse

from measure import RESULTS_MARKER, environment, markdown_table, resolve_device, short_error, write_json

import torch  # noqa: E402  (measure puts the repo on sys.path first)
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from posttrain.models.common.attention import SDPA_KERNELS  # noqa: E402
from posttrain.models.common.flash_attention_4 import activate_fa4  # noqa: E402

SHAPES = {
    "llama3-1B@8192x1": (1, 32, 8, 8192, 64),
    "qwen3-1.7B@4096x2": (2, 16, 8, 4096, 128),
    "llama3-8B@4096x2": (2, 32, 8, 4096, 128),
}


def causal_flops(b: int, h: int, s: int, d: int) -> float:
    forward = 2 * 2 * b * h * s * s / 2 * d
    return forward * 3.5


def run_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iters: int, warmup: int):
    backend = SDPA_KERNELS[kernel]
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=torch.Generator(q.device).manual_seed(1))

    def step():
        for t in (q, k, v):
            t.grad = None
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad)
        return out

    for _ in range(warmup):
        out = step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--kernels", default="auto,cudnn,flash,fa4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = resolve_device("cuda")
    kernels = [x for x in args.kernels.split(",") if x]
    for given, known, what in ((kernels, SDPA_KERNELS, "--kernels"), (args.shapes.split(","), SHAPES, "--shapes")):
        if any(x not in known for x in given):
            raise SystemExit(f"{what}: unknown {[x for x in given if x not in known]}; choose from {sorted(known)}")
    kernels.sort(key=lambda x: x == "fa4")  # stable: fa4 last
    rows, report = [], {"environment": environment(device), "results": []}
    inputs = {}
    for name in args.shapes.split(","):
        b, h, kvh, s, d = SHAPES[name]
        g = torch.Generator(device=device).manual_seed(0)
        inputs[name] = [torch.randn(b, n, s, d, device=device, dtype=torch.bfloat16, generator=g) for n in (h, kvh, kvh)]
    first: dict[str, list[torch.Tensor]] = {}
    for kernel in kernels:  # kernel-major: fa4, once on, stays on
        for name, (q, k, v) in inputs.items():
            b, h, _, s, d = SHAPES[name]
            entry = {"shape": name, "kernel": kernel}
            try:
                if kernel == "fa4":
                    activate_fa4()
                ms, outs = run_kernel(kernel, q, k, v, args.iters, args.warmup)
                ref = first.setdefault(name, outs)
                diff = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(outs, ref))
                entry.update(ms=round(ms, 3), tflops=round(causal_flops(b, h, s, d) / ms / 1e9, 1), rel_diff=diff)
            except Exception as err:  # noqa: BLE001 - one kernel that cannot take a shape must not end the run
                entry.update(failed=short_error(err))
                print(f"[{name} {kernel}] failed: {entry['failed']}", flush=True)
            report["results"].append(entry)
            rows.append([name, kernel, entry.get("ms", "-"), entry.get("tflops", "-"),
                         f"{entry['rel_diff']:.1e}" if "rel_diff" in entry else entry.get("failed", "-")])
            write_json(args.out, report)
    print(f"\n{RESULTS_MARKER} bench_attention")
    print(markdown_table(["shape", "kernel", "fwd+bwd ms", "TFLOP/s (causal)", "rel. diff vs first kernel"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
