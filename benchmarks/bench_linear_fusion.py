"""Would fusing a block's sibling projections pay? q/k/v and gate/up as separate linears against one
concatenated weight, forward + backward through autograd, at a model's shapes.

    python benchmarks/bench_linear_fusion.py --model llama3 --flavor 1B --tokens 8192 --out fusion.json

Per group (`qkv`: wq, wk, wv; `gate_up`: w1, w3) both layouts run the same math on the same bf16 input: the
separate one is what the model does (each linear its own gemm forward, its own dX gemm with autograd adding the
dX's, its own dW gemm), the fused one multiplies by the rows of all of them at once (one gemm each way). The
single linears `wo` and `w2` are timed too, as the same step's reference for what the gemms reach. Timed with CUDA
events over `--iters` after `--warmup`; TFLOP/s counts 3 x 2 x tokens x in x out per group.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from measure import environment, markdown_table, resolve_device, synchronize, write_json

import torch  # noqa: E402

from posttrain.models.registry import build_model  # noqa: E402


def groups_of(model: torch.nn.Module) -> dict[str, list[tuple[int, int]]]:
    """(out, in) of each linear in the first block's sibling groups and single projections."""
    block = model.layers[0] if not hasattr(model.layers, "values") else next(iter(model.layers.values()))
    attn, ffn = block.attention, block.feed_forward

    def shape(linear: torch.nn.Linear) -> tuple[int, int]:
        return tuple(linear.weight.shape)  # type: ignore[return-value]

    return {
        "qkv": [shape(attn.wq), shape(attn.wk), shape(attn.wv)],
        "wo": [shape(attn.wo)],
        "gate_up": [shape(ffn.w1), shape(ffn.w3)],
        "w2": [shape(ffn.w2)],
    }


def time_ms(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    synchronize(device)
    return start.elapsed_time(end) / iters


def measure(shapes: list[tuple[int, int]], tokens: int, args: argparse.Namespace, device: torch.device) -> dict:
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    d_in = shapes[0][1]
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=gen).requires_grad_()
    ws = [(torch.randn(o, i, device=device, dtype=dtype, generator=gen) * i**-0.5).requires_grad_() for o, i in shapes]
    grads = [torch.randn(tokens, o, device=device, dtype=dtype, generator=gen) for o, _ in shapes]
    fused_w = torch.cat([w.detach() for w in ws]).requires_grad_()
    fused_grad = torch.cat(grads, dim=1)

    def separate():
        outs = [torch.nn.functional.linear(x, w) for w in ws]
        torch.autograd.backward(outs, grads)
        x.grad = None
        for w in ws:
            w.grad = None

    def fused():
        torch.nn.functional.linear(x, fused_w).backward(fused_grad)
        x.grad = fused_w.grad = None

    flops = 3 * 2 * tokens * sum(o * i for o, i in shapes)
    row: dict[str, Any] = {"shapes": shapes, "tflop": flops / 1e12}
    row["separate_ms"] = time_ms(separate, args.iters, args.warmup, device)
    if len(shapes) > 1:
        row["fused_ms"] = time_ms(fused, args.iters, args.warmup, device)
    for key in ("separate_ms", "fused_ms"):
        if key in row:
            row[key.replace("_ms", "_tflops")] = flops / row[key] / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3")
    p.add_argument("--flavor", default="1B")
    p.add_argument("--tokens", type=int, default=8192, help="rows of the input (batch x sequence)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench_linear_fusion times CUDA gemms; run it on a GPU")
    model = build_model(args.model, args.flavor, "meta")
    rows = []
    for name, shapes in groups_of(model).items():
        r = measure(shapes, args.tokens, args, device)
        rows.append({"group": name, **r})
        print(f"[{name}] {r}", flush=True)
    table = [[r["group"], " + ".join(f"{o}x{i}" for o, i in r["shapes"]), f"{r['tflop']:.3f}",
              f"{r['separate_ms']:.3f}", f"{r['separate_tflops']:.0f}",
              f"{r['fused_ms']:.3f}" if "fused_ms" in r else "-",
              f"{r['fused_tflops']:.0f}" if "fused_ms" in r else "-"] for r in rows]
    print(f"\n### {args.model} {args.flavor}, {args.tokens} tokens, bf16, forward + backward per group")
    print(markdown_table(["group", "weights (out x in)", "TFLOP", "separate ms", "TFLOP/s", "fused ms", "TFLOP/s"], table))
    if args.out:
        write_json(args.out, {"env": environment(device), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
