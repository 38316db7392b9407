"""bench_sft's per-step record (`measure.StepMarks`): one host time per step, the garbage collections that fall
inside the window with the step they fell in, and nothing left registered with Python's collector afterwards; the
GPU clock sampler (`measure.GpuClockSampler`): its summary of nvidia-smi's lines and its process's life."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_sft import step_spread  # noqa: E402
from measure import GpuClockSampler, StepMarks, summarize_clock_samples  # noqa: E402


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


def test_clock_samples_summarised() -> None:
    lines = ["1980, 120.5, 0x0000000000000000", "1605, 690.2, 0x0000000000000004", "1500, 695.0, 0x0000000000000004",
             "[N/A], [N/A], [N/A]", "Failed to initialize NVML"]
    got = summarize_clock_samples(lines)
    assert got == {"samples": 3, "sm_clock_mhz": {"median": 1605.0, "min": 1500.0, "max": 1980.0},
                   "power_w_median": 690.2, "power_capped_share": 0.667}
    assert summarize_clock_samples([]) is None
    assert step_spread({"gpu_clocks": got}) == ", SM clock median 1605 MHz (power-capped 67%)"


def test_sampler_runs_its_command_for_the_window(tmp_path: Path) -> None:
    """A stand-in for nvidia-smi (none on this machine) that prints two samples and then waits to be stopped."""
    fake = tmp_path / "fake-smi"
    fake.write_text("#!/bin/sh\necho '1700, 650.0, 0x4'\necho '1800, 600.0, 0x0'\nexec sleep 30\n")
    many = tmp_path / "many-smi"  # more than a pipe holds (~64 KiB) before the window ends: drained as it comes
    many.write_text("#!/bin/sh\ni=0\nwhile [ $i -lt 5000 ]; do echo '1500, 690.0, 0x4'; i=$((i+1)); done\n"
                    "exec sleep 30\n")
    many.chmod(0o755)
    with GpuClockSampler([str(many)]) as flood:
        time.sleep(1.0)
    assert flood.summary()["samples"] == 5000
    stubborn = tmp_path / "stubborn-smi"  # ignores Ctrl-C: killed after 3 s, what it wrote is kept
    stubborn.write_text("#!/bin/sh\ntrap '' INT\necho '1600, 680.0, 0x4'\nwhile true; do sleep 0.1; done\n")
    stubborn.chmod(0o755)
    with GpuClockSampler([str(stubborn)]) as killed:
        time.sleep(0.5)
    assert killed.process.returncode is not None and killed.summary()["samples"] == 1
    fake.chmod(0o755)
    with GpuClockSampler([str(fake)]) as sampler:
        time.sleep(0.5)
    assert sampler.process.returncode is not None  # stopped at the window's end
    assert sampler.summary()["samples"] == 2 and sampler.summary()["power_capped_share"] == 0.5
    assert GpuClockSampler.for_device(torch.device("cpu")).command is None
    with GpuClockSampler([str(tmp_path / "missing-smi")]) as missing:
        pass
    assert missing.summary() is None
