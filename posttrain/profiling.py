"""Profiling chosen training steps: a torch.profiler chrome trace per rank and step, and on CUDA a memory snapshot.

`profiling.enable` with `profiling.steps = [5, 6]` (or `start_step` + `count`) writes, for each chosen step N,
`<trace_dir>/step-N/rank-R.trace.json` (open it in chrome://tracing or https://ui.perfetto.dev). With
`profiling.memory_snapshot` on CUDA, the allocator's history is recorded over the chosen steps and dumped to
`<trace_dir>/memory-step-N-rank-R.pickle` after the last of them (drag it into https://pytorch.org/memory_viz);
elsewhere the snapshot is reported as unavailable and skipped.

The trainer calls `at_step_boundary(next_step)` once before every step and `close()` after the loop; nothing
runs for steps that are not chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from posttrain.config.sections import ProfilingSection

logger = logging.getLogger("posttrain")


def profiled_steps(cfg: ProfilingSection) -> frozenset[int]:
    """The chosen step numbers (1-based optimizer steps); empty when profiling is off."""
    if not cfg.enable:
        return frozenset()
    if cfg.steps:
        steps = frozenset(int(s) for s in cfg.steps)
    else:
        steps = frozenset(range(cfg.start_step, cfg.start_step + cfg.count))
    if not steps or min(steps) < 1:
        raise SystemExit(f"profiling.steps must name optimizer steps >= 1, got {sorted(steps)}")
    return steps


class StepProfiler:
    def __init__(self, cfg: ProfilingSection, output_dir: Path, *, rank: int, device: torch.device) -> None:
        self.steps = profiled_steps(cfg)
        self.trace_dir = Path(cfg.trace_dir) if cfg.trace_dir else Path(output_dir) / "profile"
        self.rank = rank
        self.device = device
        self.memory_snapshot = cfg.memory_snapshot and bool(self.steps)
        if self.memory_snapshot and device.type != "cuda":
            if rank == 0:
                logger.warning("profiling.memory_snapshot is unavailable on %s (CUDA only); skipped", device.type)
            self.memory_snapshot = False
        self._active: profile | None = None
        self._active_step: int | None = None
        self._recording_memory = False

    def at_step_boundary(self, next_step: int) -> None:
        """Before step `next_step`: finish the previous step's trace, start this one's if it is chosen."""
        if not self.steps:
            return
        self._finish_trace()
        if next_step in self.steps:
            if self.memory_snapshot and not self._recording_memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                self._recording_memory = True
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._active = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._active.start()
            self._active_step = next_step
        elif self._recording_memory and next_step > max(self.steps):
            self._dump_memory(max(self.steps))

    def close(self) -> None:
        """After the training loop (also when it ended early)."""
        if not self.steps:
            return
        last = self._active_step
        self._finish_trace()
        if self._recording_memory:
            self._dump_memory(last if last is not None else max(self.steps))

    def _finish_trace(self) -> None:
        if self._active is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._active.stop()
        out = self.trace_dir / f"step-{self._active_step}" / f"rank-{self.rank}.trace.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        self._active.export_chrome_trace(str(out))
        logger.info("profiler trace of step %d written to %s", self._active_step, out)
        self._active, self._active_step = None, None

    def _dump_memory(self, step: int) -> None:
        out = self.trace_dir / f"memory-step-{step}-rank-{self.rank}.pickle"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(out))
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording_memory = False
        logger.info("CUDA memory snapshot written to %s", out)
