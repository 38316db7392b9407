"""RMSNorm's backward as one pass over the rows (a Triton kernel), as the op `posttrain::rms_norm_backward`.

What the compiled blocks run for it otherwise (inductor's kernels, the session-15 H200 profile of Llama-3.2-1B at
8,192 tokens): a reduction over the 8,192 rows for the weight's gradient that reads the columns strided (84 us a
norm) and a second pass for the input's gradient that recomputes the row's rms and adds the residual stream's
gradient (59 us), where reading x, dy and the residual's gradient once and writing dx takes ~35 us at the HBM's
speed. Here each program walks a contiguous range of rows, several rows a trip (about 2,048 elements): it reads x
and dy once, adds the residual's gradient when given (`RMSNorm.with_residual`: the norm's input is also the
residual stream, whose gradient autograd would otherwise add in a pass of its own), writes dx, and keeps its share
of the weight's gradient in registers (one fp32 row per program, summed after). The rms comes saved from the
forward (`RMSNorm` with `own_backward`). Measured on the H200 with one row a trip and no residual (sessions 16-17),
the op lost to inductor's kernels in the compiled step (Llama-3.2-1B +0.8 ms: inductor had fused the residual's
gradient add, the op could not; Qwen3-4B +12.5 ms with the per-head q / k norms on it too): that is why it is
opt-in; the several-rows trip with the residual is not measured yet. Inductor's kernels for the compiled block
(built on a CPU with GPU-style scheduling, BENCHMARKS.md session 19) read more than x, dy and the residual's
gradient: the projections' input gradients unsummed, the norm's input recomputed from the residual add, and they
write the recomputed norm output for the weight gradients; they run at ~3.9 TB/s on the H200. By inductor's byte
counts the op adds ~66 MB a Llama-3.2-1B block (it needs dy in one tensor and reads it again): it is not expected to
pay.

Math (fp32 throughout, x_hat = x * rstd, w' = w or 1 + w for zero-centred norms, r the residual's gradient or 0):
    dx = rstd * (dy w' - x_hat * mean(dy w' x_hat)) + r,    dw = sum over rows of dy * n
with n the forward's normalised value as it multiplied w: x_hat rounded to x's dtype (`w * x_hat.to(dtype)`), or
x_hat itself for zero-centred norms (`(x_hat * (1 + w)).to(dtype)`). Elsewhere (CPU, no Triton, a kernel that
could not be built: one warning) the same math in torch ops.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["rms_norm_backward", "rms_norm_backward_reference"]

logger = logging.getLogger("posttrain")

# Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors: how the CPU tests check it.
_DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
_kernel_failed: str | None = None  # why the kernel could not be built here; the torch ops from then on
_kernel_ran = False


if triton is not None:

    @triton.jit
    def _rms_norm_backward_rows(dy_ptr, x_ptr, w_ptr, rstd_ptr, residual_grad_ptr, dx_ptr, dw_partial_ptr, n_rows,
                                n_cols, rows_per_program, ZERO_CENTERED: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # ROWS rows a trip: with narrow rows (per-head q / k norms: 128 columns) one row a trip left each program
        # waiting on one small load after the other.
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        in_row = cols < n_cols
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = w + 1.0
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program  # int64 rows: row * n_cols may pass 2**31
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < last
            mask = in_rows[:, None] & in_row[None, :]
            offsets = rows[:, None] * n_cols + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=in_rows, other=0.0)
            x_hat = x * rstd[:, None]
            if ZERO_CENTERED:
                dw += tl.sum(dy * x_hat, 0)
            else:
                dw += tl.sum(dy * x_hat.to(dx_ptr.dtype.element_ty).to(tl.float32), 0)
            dn = dy * w[None, :]
            mean = tl.sum(dn * x_hat, 1) / n_cols
            dx = rstd[:, None] * (dn - x_hat * mean[:, None])
            if HAS_RESIDUAL:
                dx += tl.load(residual_grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_partial_ptr + program.to(tl.int64) * n_cols + cols, dw, mask=in_row)


# Elements of x a program holds per trip (ROWS x BLOCK) and per thread. Compiled for sm_90 (cuobjdump's resource
# usage of the cubin, built on a CPU: tests/unit/test_triton_kernels_build.py), 4 elements a thread take 42-75
# registers (2,048 x 1 at 16 warps, 4,096 x 1 at 32, 128 x 16 at 16): 16-32 warps resident per SM; 16 a thread took
# 150-181 (4,096 x 1 or 2,048 x 2 at 8 warps): one 8-warp program per SM, too few loads in flight. Rows wider than
# 4,096 (a BLOCK of 8,192 at the 32-warp cap) hold 8 a thread: 62 registers.
_TILE_ELEMENTS = 2048
_ELEMENTS_PER_THREAD = 4


@functools.cache
def _programs_per_device(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def launch_shape(n_rows: int, n_cols: int, max_programs: int) -> tuple[int, int, int, int, int]:
    """(rows_per_program, programs, BLOCK, ROWS, num_warps) of the kernel's launch for n_rows x n_cols."""
    rows_per_program = triton.cdiv(n_rows, min(n_rows, max_programs))
    programs = triton.cdiv(n_rows, rows_per_program)
    block = triton.next_power_of_2(n_cols)
    rows_per_trip = max(1, min(_TILE_ELEMENTS // block, triton.next_power_of_2(rows_per_program)))
    num_warps = min(32, max(4, block * rows_per_trip // (32 * _ELEMENTS_PER_THREAD)))
    return rows_per_program, programs, block, rows_per_trip, num_warps


def _kernel_takes(dy: Tensor, x: Tensor, residual_grad: Tensor | None = None) -> bool:
    return (triton is not None and x.device.type in _DEVICE_TYPES and x.numel() > 0 and dy.shape == x.shape
            and (residual_grad is None or residual_grad.shape == x.shape))


def rms_norm_backward_reference(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, zero_centered: bool,
                                residual_grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same math in torch ops (fp32): what runs where the kernel does not."""
    x_hat = x.float() * rstd.reshape(*x.shape[:-1], 1)
    dyf = dy.float()
    w = weight.float() + 1.0 if zero_centered else weight.float()
    n = x_hat if zero_centered else x_hat.to(x.dtype).float()
    dw = (dyf * n).reshape(-1, x.shape[-1]).sum(0)
    dn = dyf * w
    dx = rstd.reshape(*x.shape[:-1], 1) * (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True))
    if residual_grad is not None:
        dx = dx + residual_grad.float()
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype)


@torch.library.custom_op("posttrain::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, zero_centered: bool,
                      residual_grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of `RMSNorm` given its output's gradient `dy`, its input `x` and the forward's `rstd` (one per
    row of x); dx in x's dtype, dweight in the weight's. `residual_grad` (x's shape): the gradient x gets through
    its other use, the residual stream, added into dx."""
    global _kernel_failed, _kernel_ran
    if _kernel_failed is None and _kernel_takes(dy, x, residual_grad):
        try:
            out = _kernel_backward(dy, x, weight, rstd, zero_centered, residual_grad)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - a build error on the first launch, before anything is written
            if _kernel_ran:
                raise
            _kernel_failed = f"{type(err).__name__}: {str(err)[:200]}"
            logger.warning("Triton RMSNorm backward unavailable (%s); using the torch ops", _kernel_failed)
        else:
            _kernel_ran = True
            return out
    return rms_norm_backward_reference(dy, x, weight, rstd, zero_centered, residual_grad)


def _kernel_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, zero_centered: bool,
                     residual_grad: Tensor | None) -> tuple[Tensor, Tensor]:
    n_cols = x.shape[-1]
    x_rows = x.reshape(-1, n_cols).contiguous()
    dy_rows = dy.reshape(-1, n_cols).contiguous()
    # without a residual the kernel never reads its pointer: dy stands in
    residual_rows = dy_rows if residual_grad is None else residual_grad.reshape(-1, n_cols).contiguous()
    n_rows = x_rows.shape[0]
    cap = _programs_per_device(x.device.index or 0) if x.is_cuda else 8
    rows_per_program, programs, block, rows_per_trip, num_warps = launch_shape(n_rows, n_cols, cap)
    dx = torch.empty_like(x_rows)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        _rms_norm_backward_rows[(programs,)](
            dy_rows, x_rows, weight.contiguous(), rstd.reshape(-1).float().contiguous(), residual_rows, dx, dw_partial,
            n_rows, n_cols, rows_per_program, ZERO_CENTERED=zero_centered, HAS_RESIDUAL=residual_grad is not None,
            BLOCK=block, ROWS=rows_per_trip, num_warps=num_warps,
        )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, zero_centered: bool,
      residual_grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)  # contiguous, as both real paths return them
