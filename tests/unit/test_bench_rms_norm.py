"""benchmarks/bench_rms_norm.py times CUDA kernels: on the CPU it refuses in one line, as it does a shape or a
launch it cannot run; its block's gradients with the op equal autograd's (the CPU runs the op's torch math)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_rms_norm import NormBlock  # noqa: E402


@pytest.mark.parametrize(("extra", "message"), [
    (["--device", "cpu"], "bench_rms_norm times CUDA kernels: run it on a GPU"),
    (["--shapes", "8192by2048"], "--shapes: '8192by2048' is not TOKENSxWIDTH"),
    (["--launches", "2048:4"], "--launches: '2048:4' is not TILE:PER_THREAD:PER_SM"),
    (["--launches", "1000:4:4"], "--launches: '1000:4:4': TILE a power of two"),
    (["--variants", "liger"], "--variants: unknown ['liger']"),
])
def test_refusals_are_one_line(extra: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_rms_norm.py"), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_blocks_gradients_with_the_op_equal_autograds() -> None:
    grads = []
    for impl in ("autograd", "triton", "gemv"):
        torch.manual_seed(0)
        blocks = torch.nn.Sequential(NormBlock(64, 8, 3, impl), NormBlock(64, 8, 2, impl))
        x = torch.randn(32, 64, requires_grad=True, generator=torch.Generator().manual_seed(1))
        blocks(x).backward(torch.randn(32, 64, generator=torch.Generator().manual_seed(2)))
        grads.append([x.grad, *(p.grad for p in blocks.parameters())])
    for other in grads[1:]:
        for ours, autograds in zip(other, grads[0]):
            torch.testing.assert_close(ours, autograds, rtol=1e-5, atol=1e-6)
