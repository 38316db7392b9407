"""benchmarks/bench_optimizer.py times CUDA kernels: on the CPU it refuses in one line (the GPU runs are in
BENCHMARKS.md), as it does a clipping threshold that would divide every gradient by infinity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("extra", "message"), [
    (["--device", "cpu"], "bench_optimizer times CUDA kernels: run it on a GPU"),
    (["--device", "cpu", "--max-grad-norm", "0"], "--max-grad-norm 0.0: must be > 0"),
])
def test_refusals_are_one_line(extra: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_optimizer.py"), "--flavor", "debug", *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
