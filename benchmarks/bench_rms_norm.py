"""RMSNorm's backward: inductor's kernels against posttrain's Triton kernel, in compiled blocks and alone.

    python benchmarks/bench_rms_norm.py --shapes 8192x2048,8192x2560,8192x4096 --out norm.json

For each shape (tokens x width, bf16):

1. **Blocks** (`--variants`): `--blocks` compiled pre-norm blocks, each ``normed, x = norm.with_residual(x); h = x +
   up(cat(down_i(normed)))`` with `--branches` rank-`--rank` projections: the norm's output gradient is a sum of
   matmul outputs (q / k / v's input gradients in attention) and its input gets the residual stream's gradient
   too, as in a transformer block, while the projections stay small beside the norm; the partitioner rebuilds the
   norm's output in backward as in the step (`--recompute-pointwise`, `compile.recompute_pointwise`). Variants: ``inductor`` (autograd's backward, compiled by
   inductor), ``inductor-nomix`` (the same without inductor's mix-order reduction, which fuses the weight
   gradient's column sum with the row pass), ``triton`` (`model.rms_norm_backward = "triton"`: the op), ``gemv``
   (`"gemv"`: torch ops for inductor, the weight gradient as a matrix-vector product).
   Timed with CUDA events: forward, forward + backward, and their difference; the projections are the same in
   every variant, so the backward's difference between variants is the norms'. The profiler's kernel times of a
   forward + backward are kept in the JSON (`--profile`), with the count of mix-order reductions inductor generated.
2. **The op alone** (`--launches`, each ``TILE:PER_THREAD:PER_SM``: elements of x a program holds a trip, elements
   a thread holds, programs per SM at most; `rms_norm_backward.launch_config`): dy, x and the residual's gradient
   in buffers of their own; microseconds a call and TB/s of the bytes it must move (x, dy and the residual's
   gradient read, dx written), against inductor's compile of the same math (`rms_norm_backward_reference`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from measure import environment, free_memory, markdown_table, resolve_device, synchronize, write_json
from profile_summary import profile_steps, summarize

import torch  # noqa: E402
from torch import nn  # noqa: E402

from posttrain.models.common import rms_norm_backward as norm_backward  # noqa: E402
from posttrain.models.common.rms_norm import RMSNorm  # noqa: E402
from posttrain.parallelisms.compile import partitioner_settings_kept, set_pointwise_recompute  # noqa: E402

VARIANTS = ("inductor", "inductor-nomix", "triton", "gemv")
IMPLS = {"inductor": "autograd", "inductor-nomix": "autograd", "triton": "triton", "gemv": "gemv"}


class NormBlock(nn.Module):
    """A pre-norm block whose branch reads the normed input through `branches` low-rank projections (q / k / v:
    three, gate / up: two), so that the norm's output gradient is a sum of matmul outputs, as in the model."""

    def __init__(self, width: int, rank: int, branches: int, backward_impl: str) -> None:
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-5)
        self.norm.backward_impl = backward_impl
        self.downs = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(branches))
        self.up = nn.Linear(branches * rank, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed, x = self.norm.with_residual(x)
        return x + self.up(torch.cat([down(normed) for down in self.downs], dim=-1))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            rows, cols = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not TOKENSxWIDTH (e.g. 8192x2048)") from None
        if rows < 1 or cols < 1:
            raise SystemExit(f"--shapes: {item!r} must be positive")
        shapes.append((rows, cols))
    if not shapes:
        raise SystemExit("--shapes: give at least one TOKENSxWIDTH")
    return shapes


def parse_launches(text: str) -> list[tuple[int, int, int]]:
    launches = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            tile, per_thread, per_sm = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--launches: {item!r} is not TILE:PER_THREAD:PER_SM (e.g. 2048:4:4)") from None
        if min(tile, per_thread, per_sm) < 1 or tile & (tile - 1):
            raise SystemExit(f"--launches: {item!r}: TILE a power of two, every value >= 1")
        launches.append((tile, per_thread, per_sm))
    return launches


def cuda_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_blocks(variant: str, rows: int, cols: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics as inductor_metrics

    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = nn.Sequential(*(NormBlock(cols, args.rank, args.branches, IMPLS[variant]) for _ in range(args.blocks)))
    blocks = blocks.to(device=device, dtype=torch.bfloat16)
    for block in blocks:
        block.compile()
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)

    def forward() -> torch.Tensor:
        return blocks(x)

    def step() -> None:  # fresh gradients each time, as a training step's (no accumulation kernels)
        blocks.zero_grad(set_to_none=True)
        x.grad = None
        blocks(x).backward(grad)

    # no FX graph cache: a graph loaded from it is not generated again, and the count below would read 0
    patch = {"triton.mix_order_reduction": variant != "inductor-nomix", "fx_graph_cache": False}
    inductor_metrics.reset()
    with inductor_config.patch(patch), partitioner_settings_kept():
        set_pointwise_recompute(args.recompute_pointwise)
        step()  # compiles
        synchronize(device)
        mixed = inductor_metrics.codegen_mix_order_reduction
        forward_ms = cuda_ms(forward, args.iters, args.warmup)
        step_ms = cuda_ms(step, args.iters, args.warmup)
        profiled = summarize(*profile_steps(step, 3, device), 3, top=12) if args.profile else {}
    result = {"variant": variant, "shape": f"{rows}x{cols}", "blocks": args.blocks, "forward_ms": forward_ms,
              "step_ms": step_ms, "backward_ms": step_ms - forward_ms, "mix_order_reductions": mixed,
              "profile_ms_per_call": profiled}
    del blocks, x, grad
    free_memory(device)
    return result


def run_op(rows: int, cols: int, launches: list[tuple[int, int, int]], args: argparse.Namespace,
           device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    x, dy, residual = (torch.randn(rows, cols, device=device, dtype=torch.bfloat16) for _ in range(3))
    w = (1 + 0.1 * torch.randn(cols, device=device)).to(torch.bfloat16)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)
    moved = 4 * rows * cols * x.element_size()
    compiled = torch.compile(norm_backward.rms_norm_backward_reference)
    want = norm_backward.rms_norm_backward_reference(dy, x, w, rstd, False, residual)

    def entry(name: str, fn) -> dict[str, Any]:
        dx, dw = fn()
        err = max(((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                  for got, ref in ((dx, want[0]), (dw, want[1])))
        us = cuda_ms(fn, args.iters, args.warmup) * 1e3
        return {"shape": f"{rows}x{cols}", "launch": name, "us": us, "tb_s": moved / us / 1e6, "max_rel_err": err}

    results = [entry("inductor (the same math compiled)", lambda: compiled(dy, x, w, rstd, False, residual))]
    for tile, per_thread, per_sm in launches:
        with norm_backward.launch_config(tile, per_thread, per_sm):
            cap = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
            rows_per_program, programs, block, rows_per_trip, warps = norm_backward.launch_shape(rows, cols, cap)
            r = entry(f"{tile}:{per_thread}:{per_sm}",
                      lambda: norm_backward.rms_norm_backward(dy, x, w, rstd, False, residual))
        if norm_backward._kernel_failed is not None:  # the op fell back to the torch ops: nothing to time
            raise SystemExit(f"the Triton kernel did not build here: {norm_backward._kernel_failed}")
        r.update(programs=programs, rows_per_trip=rows_per_trip, num_warps=warps)
        results.append(r)
    del x, dy, residual, compiled
    free_memory(device)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8192x2048,8192x2560,8192x4096", help="TOKENSxWIDTH, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"block variants, comma-separated: {VARIANTS}")
    p.add_argument("--launches", default="2048:4:4,2048:4:2,2048:4:8,4096:4:4,8192:4:4,2048:8:4,2048:2:4",
                   help="the op's launches TILE:PER_THREAD:PER_SM, comma-separated ('' for none)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--branches", type=int, default=3, help="projections reading the normed input (q / k / v: 3)")
    p.add_argument("--recompute-pointwise", action=argparse.BooleanOptionalAction, default=True,
                   help="the partitioner rebuilds the norm's output in backward, as `compile.recompute_pointwise` "
                        "(the default) has the step's blocks do")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; use {list(VARIANTS)}")
    launches = parse_launches(args.launches)
    if min(args.blocks, args.rank, args.branches, args.iters) < 1 or args.warmup < 0:
        raise SystemExit("--blocks, --rank, --branches and --iters must be >= 1, --warmup >= 0")
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench_rms_norm times CUDA kernels: run it on a GPU (--device cuda)")
    blocks = [run_blocks(v, rows, cols, args, device) for rows, cols in shapes for v in variants]
    ops = [r for rows, cols in shapes for r in run_op(rows, cols, launches, args, device)]
    write_json(args.out, {"env": environment(device), "args": vars(args), "blocks": blocks, "op": ops})
    print("=== RESULTS ===")
    print(f"{args.blocks} compiled blocks (norm + {args.branches} rank-{args.rank} projections), bf16, "
          f"{args.iters} timed calls")
    print(markdown_table(["shape", "variant", "forward ms", "fwd + bwd ms", "backward ms", "mix-order reductions"],
                         [[r["shape"], r["variant"], f"{r['forward_ms']:.3f}", f"{r['step_ms']:.3f}",
                           f"{r['backward_ms']:.3f}", r["mix_order_reductions"]] for r in blocks]))
    print("the op alone (x, dy, residual gradient read; dx written)")
    print(markdown_table(["shape", "launch", "programs", "rows a trip", "warps", "us", "TB/s", "max rel err"],
                         [[r["shape"], r["launch"], r.get("programs", "-"), r.get("rows_per_trip", "-"),
                           r.get("num_warps", "-"), f"{r['us']:.1f}", f"{r['tb_s']:.2f}", f"{r['max_rel_err']:.1e}"]
                          for r in ops]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
