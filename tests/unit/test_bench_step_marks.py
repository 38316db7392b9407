"""bench_sft's per-step record (`measure.StepMarks`): one host time per step, the garbage collections that fall
inside the window with the step they fell in, and nothing left registered with Python's collector afterwards."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_sft import step_spread  # noqa: E402
from measure import StepMarks  # noqa: E402


def test_host_times_per_step_and_a_full_collection_in_its_step() -> None:
    with StepMarks(torch.device("cpu")) as marks:
        for i in range(3):
            marks.mark()
            time.sleep(0.02 * (i + 1))
            if i == 1:
                gc.collect()  # a full collection inside the second step
        marks.mark()
    assert marks._on_gc not in gc.callbacks
    out = marks.per_step_ms()
    assert "device_step_ms" not in out  # CPU: host times only
    host = out["host_step_ms"]
    assert len(host) == 3
    assert host[0] >= 19 and host[2] >= 59 and host[2] > host[0]
    full = [p for p in out["gc_pauses"] if p["generation"] == 2]
    assert full and full[0]["step"] == 2
    assert out["gc_pause_ms_total"] >= full[0]["ms"] >= 0


def test_callback_removed_when_the_window_raises() -> None:
    try:
        with StepMarks(torch.device("cpu")) as marks:
            marks.mark()
            raise RuntimeError("step failed")
    except RuntimeError:
        pass
    assert marks._on_gc not in gc.callbacks


def test_step_spread_line() -> None:
    assert step_spread({"device_step_ms": [140.0, 150.0, 139.0]}) == \
        ", device step ms median 140.0 (min 139.0, max 150.0)"
    assert step_spread({"host_step_ms": [1.0]}) == ""
