"""The AdamW step alone on a real model's parameters: torch's fused kernel against posttrain's Triton kernel.

    python benchmarks/bench_optimizer.py --model llama3 --flavor 1B --out opt.json

For each kernel (`--kernels`, `optimizer.fused` values: `true` = torch's fused, `triton`, `false` = foreach) the
model is built with `--dtype` parameters (and AdamW states: build_optimizer's two groups, decay on matrices), every
parameter drawn from the same seed, and one set of gradients (same seed) is kept for every step. A step is what
`Trainer.train_step` does after backward: the total gradient norm (`optim.total_grad_norm`: the Triton AdamW's own
where it runs, torch's foreach norm otherwise), the clipping divisor passed as `grad_scale`, the optimizer step.
Timed with CUDA events over `--steps` steps after `--warmup`; "bandwidth" counts the traffic AdamW needs (read
parameter, gradient and both moments, write parameter and both moments: 7 x the parameter bytes) over the optimizer
step alone; torch's fused kernel also writes the divided gradients back (8 x),
which the column does not count. After the same steps every kernel's parameters are compared with
the first kernel's: the largest difference relative to the largest parameter, and the share of elements that
differ (both kernels round fp32 math to bf16; a different order of fp32 operations moves some by one ulp).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from measure import environment, free_memory, markdown_table, resolve_device, synchronize, write_json

import torch  # noqa: E402

from posttrain.config.sections import OptimizerSection  # noqa: E402
from posttrain.models.registry import build_model  # noqa: E402
from posttrain.optim import build_optimizer, total_grad_norm  # noqa: E402
from posttrain.parallelisms.grad_clip import clip_divisor, get_total_grad_norm  # noqa: E402

KERNEL_NAMES = {"true": "torch fused", "triton": "posttrain triton", "false": "torch foreach"}


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = build_model(args.model, args.flavor, "meta")
    model.to_empty(device=device)
    model.to(dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        gen.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    return model


def run_kernel(kernel: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = build(args, device, dtype)
    params = [p for p in model.parameters()]
    optimizer = build_optimizer(model, OptimizerSection(lr=args.lr, fused=kernel), device)

    fused = bool(optimizer.defaults.get("fused"))

    def step(start: torch.cuda.Event, mid: torch.cuda.Event, end: torch.cuda.Event) -> None:
        start.record()
        divisor = clip_divisor(total_grad_norm(optimizer, params), args.max_grad_norm)
        mid.record()
        if fused:
            optimizer.grad_scale = divisor
        else:
            torch._foreach_div_([p.grad for p in params], divisor)
        optimizer.step()
        end.record()

    def new_events() -> tuple[torch.cuda.Event, ...]:
        return tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))

    for _ in range(args.warmup):
        step(*new_events())
    synchronize(device)
    events = [new_events() for _ in range(args.steps)]
    t0 = time.perf_counter()
    for e in events:
        step(*e)
    synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    numel = sum(p.numel() for p in params)
    step_ms = sum(m.elapsed_time(e) for _, m, e in events) / args.steps
    norm_ms = sum(s.elapsed_time(m) for s, m, _ in events) / args.steps
    norms = (float(total_grad_norm(optimizer, params)), float(get_total_grad_norm(params)))
    flat = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
    result = {
        "kernel": KERNEL_NAMES[kernel], "optimizer": type(optimizer).__name__, "params": numel,
        "step_ms": step_ms, "norm_ms": norm_ms, "wall_ms_per_step": wall_ms,
        "bandwidth_tb_s": 7 * numel * flat.element_size() / (step_ms * 1e-3) / 1e12,
        # the norm the step used against torch's foreach norm of the same gradients
        "grad_norm": norms[0], "grad_norm_rel_diff": abs(norms[0] - norms[1]) / norms[1],
    }
    del optimizer, model, params
    free_memory(device)
    return result | {"_flat": flat}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3")
    p.add_argument("--flavor", default="1B")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--kernels", default="true,triton", help=f"comma-separated optimizer.fused values: {list(KERNEL_NAMES)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1e6,
                   help="clipping threshold; the default never clips, so torch's fused kernel, which writes the "
                        "divided gradients back, leaves them as the Triton kernel does and every step sees the same")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.max_grad_norm <= 0:
        raise SystemExit(f"--max-grad-norm {args.max_grad_norm}: must be > 0 (the default never clips)")
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench_optimizer times CUDA kernels: run it on a GPU (--device cuda)")
    dtype = getattr(torch, args.dtype)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNEL_NAMES]
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; use {list(KERNEL_NAMES)}")
    results = [run_kernel(k, args, device, dtype) for k in kernels]
    reference = results[0].pop("_flat")
    scale = reference.float().abs().max().item()
    rows = []
    for i, r in enumerate(results):
        flat = reference if i == 0 else r.pop("_flat")
        diff = (flat.float() - reference.float()).abs()
        r["max_diff_vs_first"] = diff.max().item() / scale
        r["share_differing"] = (diff > 0).float().mean().item()
        rows.append([r["kernel"], f"{r['params'] / 1e9:.3f}B", f"{r['step_ms']:.2f}", f"{r['norm_ms']:.2f}",
                     f"{r['bandwidth_tb_s']:.2f}", f"{r['wall_ms_per_step']:.2f}",
                     f"{r['max_diff_vs_first']:.1e}", f"{r['share_differing']:.1e}", f"{r['grad_norm_rel_diff']:.1e}"])
    write_json(args.out, {"env": environment(device), "args": vars(args), "results": results})
    print("=== RESULTS ===")
    print(f"{args.model} {args.flavor}, {args.dtype}, {args.steps} timed steps after {args.warmup}")
    print(markdown_table(["kernel", "params", "step ms", "grad norm ms", "TB/s (7 x param bytes)",
                          "wall ms / step (norm + step)", "max diff vs first", "share differing",
                          "norm vs torch's foreach norm"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
