"""The RMSNorm backward's Triton kernel on the device, at the widths it serves (block norms of 2,048-5,120
columns, per-head q / k norms of 128): dx and dweight against the same math in fp32 torch ops, with and without
the residual stream's gradient added in the pass; its time against the torch math compiled by inductor is
recorded (not asserted: BENCHMARKS.md says what pays in a step)."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.common import rms_norm_backward as norm


def _inputs(device: torch.device, rows: int, cols: int, dtype: torch.dtype, residual: bool):
    g = torch.Generator(device).manual_seed(0)
    x, dy, r = (torch.randn(rows, cols, device=device, generator=g).to(dtype) for _ in range(3))
    w = (1 + 0.1 * torch.randn(cols, device=device, generator=g)).to(dtype)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    return dy, x, w, rstd, (r if residual else None)


SHAPES = [(8192, 2048), (8192, 2560), (8192, 4096), (4096, 5120), (65536, 128), (300, 128)]
# every width in bf16, with and without the residual; fp32 and zero-centred (Gemma) norms on two of them
CASES = ([(*shape, torch.bfloat16, residual, False) for shape in SHAPES for residual in (False, True)]
         + [(*shape, dtype, True, zero_centered) for shape in ((8192, 2048), (65536, 128))
            for dtype, zero_centered in ((torch.float32, False), (torch.bfloat16, True))])


@pytest.mark.parametrize("rows, cols, dtype, residual, zero_centered", CASES)
def test_kernel_matches_the_torch_math(device: torch.device, rows: int, cols: int, dtype: torch.dtype,
                                       residual: bool, zero_centered: bool) -> None:
    if device.type != "cuda" or norm.triton is None:
        pytest.skip("the kernel runs on CUDA with Triton; the CPU tests check it through Triton's interpreter")
    dy, x, w, rstd, r = _inputs(device, rows, cols, dtype, residual)
    dx, dw = norm.rms_norm_backward(dy, x, w, rstd, zero_centered, r)
    assert norm._kernel_failed is None and norm._kernel_ran
    rx, rw = norm.rms_norm_backward_reference(dy, x, w, rstd, zero_centered, r)
    assert dx.dtype == dtype and dw.dtype == dtype
    # fp32: summation order (dw sums `rows` terms); bf16: one rounding of each output
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for got, want in ((dx, rx), (dw, rw)):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert err <= tol, err


@pytest.mark.parametrize("rows, cols", [(8192, 2048), (8192, 2560), (8192, 4096)])
def test_kernel_time_against_inductor(device: torch.device, rows: int, cols: int, record_property) -> None:
    if device.type != "cuda" or norm.triton is None:
        pytest.skip("timing the kernel needs CUDA")
    dy, x, w, rstd, r = _inputs(device, rows, cols, torch.bfloat16, residual=True)
    compiled = torch.compile(norm.rms_norm_backward_reference)

    def timed(fn) -> float:
        for _ in range(3):
            fn(dy, x, w, rstd, False, r)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn(dy, x, w, rstd, False, r)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / 50

    kernel_us, inductor_us = timed(norm.rms_norm_backward), timed(compiled)
    moved = 4 * rows * cols * 2  # x, dy and the residual's gradient read, dx written (bf16)
    record_property("us", f"{rows}x{cols}: kernel {kernel_us:.1f} us ({moved / kernel_us / 1e6:.2f} TB/s), "
                          f"inductor {inductor_us:.1f} us")
