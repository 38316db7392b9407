"""Cross-entropy rows and d loss / d logits of one chunk of logits in one Triton kernel, in place.

One program per row: a first pass over the row keeps a running max and sum of exponentials (online softmax),
so the logsumexp costs one read; a second pass overwrites the row with `softmax - one_hot(target)`. Three passes
over the bf16 chunk in all (read, read, write), against the ~5 of `torch.compile`'s two kernels for the same
math (`logit_math.ce_grad_`), which the H200 profile measured at 8.5 ms of a 205 ms Qwen3-1.7B step. In the
H200 profile of a Llama-3.2-1B step it took 1.82 ms for 8,192 rows of 128,256 (~3.5 TB/s counting three passes).

`L2_PROGRAMS_PER_SM > 0` (not measured yet, off): that many programs per SM loop over the rows instead, and the
second pass walks the row backwards, so the blocks it reads first are the ones the first pass read last, while
few enough rows are in flight (~256 KB each at vocab 128k) for them to still sit in L2: the second read would
then cost little HBM traffic.

Same contract as `logit_math.ce_grad_` without soft-capping: fp32 math, the gradient rounded once to the
chunk's dtype. Used on CUDA when Triton imports; `ce_grad_fn` says which implementation a caller gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled / eager math is used instead
    triton = None

logger = logging.getLogger("posttrain")

__all__ = ["ce_grad_fn", "ce_grad_rows_", "ce_grad_status", "l2_programs_per_sm", "triton_ce_grad_available"]

_BLOCK = 4096
L2_PROGRAMS_PER_SM = 0  # 0: one program per row; > 0: a persistent grid re-reading rows from L2 (docstring)


def triton_ce_grad_available(device: torch.device, softcap: float | None) -> bool:
    return triton is not None and device.type == "cuda" and softcap is None


if triton is not None:

    @triton.jit
    def _ce_grad_kernel(logits_ptr, row_stride, targets_ptr, rows_ptr, n_rows, n_cols, BLOCK: tl.constexpr,
                        BACKWARD_SECOND_PASS: tl.constexpr):
        n_blocks = tl.cdiv(n_cols, BLOCK)
        first_row = tl.program_id(0).to(tl.int64)  # the grid never exceeds n_rows
        n_programs = tl.num_programs(0)
        for k in range(0, (n_rows - 1 - tl.program_id(0)) // n_programs + 1):
            row = first_row + k * n_programs
            base = logits_ptr + row * row_stride
            target = tl.load(targets_ptr + row)
            running_max = tl.full([], float("-inf"), tl.float32)
            running_sum = tl.full([], 0.0, tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(z, 0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            z_target = tl.load(base + target).to(tl.float32)
            tl.store(rows_ptr + row, lse - z_target)
            for i in range(0, n_blocks):
                block = n_blocks - 1 - i if BACKWARD_SECOND_PASS else i
                cols = block * BLOCK + tl.arange(0, BLOCK)
                in_row = cols < n_cols
                z = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32)
                grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def ce_grad_rows_(logits: Tensor, targets: Tensor, softcap: float | None = None) -> Tensor:
    """Per-row cross-entropy `[c]` (fp32); `logits` `[c, V]` is overwritten with d(sum of rows) / d logits."""
    if softcap is not None:
        raise ValueError("ce_grad_rows_ has no soft-capping; use logit_math.ce_grad_")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-major [rows, vocab] matrix, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    n_rows = logits.shape[0]
    if n_rows:
        programs = n_rows
        if L2_PROGRAMS_PER_SM > 0:
            programs = min(n_rows, L2_PROGRAMS_PER_SM * _sm_count(logits.device))
        _ce_grad_kernel[(programs,)](
            logits, logits.stride(0), targets.contiguous(), rows, n_rows, logits.shape[1], BLOCK=_BLOCK,
            BACKWARD_SECOND_PASS=L2_PROGRAMS_PER_SM > 0, num_warps=8,
        )
    return rows


@contextmanager
def l2_programs_per_sm(k: int) -> Iterator[None]:
    """`L2_PROGRAMS_PER_SM = k` inside the block (benchmarks' A/B of the two layouts), 0 again after."""
    global L2_PROGRAMS_PER_SM
    L2_PROGRAMS_PER_SM = k
    try:
        yield
    finally:
        L2_PROGRAMS_PER_SM = 0


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's CPU interpreter (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


_kernel_failed: str | None = None  # why the kernel could not be built here; the fallback is used from then on


def ce_grad_status(device: torch.device) -> str:
    """Which implementation the fused cross-entropy's chunk math runs on `device` (for benchmark records)."""
    if not triton_ce_grad_available(device, None):
        return "compiled/eager ce_grad_ (no CUDA or no Triton)"
    return "triton" if _kernel_failed is None else f"compiled ce_grad_ (the kernel failed: {_kernel_failed})"


def ce_grad_fn(device: torch.device, softcap: float | None, fallback: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The Triton kernel where it applies, else `fallback` (the compiled or eager `ce_grad_`). Should the kernel
    fail to build (a Triton version without some feature), the fallback takes over with one warning."""
    if not triton_ce_grad_available(device, softcap) or _kernel_failed is not None:
        return fallback

    def kernel_or_fallback(logits: Tensor, targets: Tensor, softcap: float | None = None) -> Tensor:
        global _kernel_failed
        if _kernel_failed is None:
            try:
                return ce_grad_rows_(logits, targets, softcap)
            except Exception as err:  # noqa: BLE001 - a compile error happens before the kernel touches logits
                _kernel_failed = f"{type(err).__name__}: {str(err)[:200]}"
                logger.warning("Triton cross-entropy kernel unavailable (%s); using the compiled math", _kernel_failed)
        return fallback(logits, targets, softcap)

    return kernel_or_fallback
