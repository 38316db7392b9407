"""Measuring on one device, shared by the benchmarks: synchronised timing, peak memory, freeing memory
between runs, a wall-clock budget, the environment record, and the markdown table the scripts print last.

The benchmarks run as scripts (`python benchmarks/bench_sft.py ...`), so this module is imported by its
bare name; `ensure_repo_on_path()` makes `import posttrain` work without installing the package.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_repo_on_path() -> None:
    """Put the repository root first on sys.path so `posttrain` is importable from a plain checkout."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


ensure_repo_on_path()

import torch  # noqa: E402


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu")
        # an explicit index: torch.cuda.set_device(torch.device("cuda")) raises
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepMarks:
    """Where each timed step starts, on the host (perf_counter when `step()` is called) and on the device (a CUDA
    event queued at that point). A host running ahead shows host steps shorter than the device's; once CUDA's launch
    queue is full the host waits and its steps equal the device's (no GPU idle). A device step far longer than its
    neighbours with a host step as long says the host held the GPU up (a stall longer than the queue's lead)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: list[float] = []
        self.events: list[Any] = []
        self.gc_pauses: list[dict[str, Any]] = []  # Python's collections inside the window: step, generation, ms
        self._gc_start = 0.0

    def __enter__(self) -> "StepMarks":
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_pauses.append({"step": len(self.host), "generation": info["generation"],
                                   "ms": round(1000 * (time.perf_counter() - self._gc_start), 2)})

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def per_step_ms(self) -> dict[str, Any]:
        """After a synchronize: host and device (CUDA) milliseconds per step, and the garbage collections that
        took 1 ms or more or were full ones (the step they fell in, counted from 1)."""
        out = {"host_step_ms": [round(1000 * (b - a), 2) for a, b in zip(self.host, self.host[1:])]}
        if self.cuda:
            out["device_step_ms"] = [round(a.elapsed_time(b), 2) for a, b in zip(self.events, self.events[1:])]
        out["gc_pauses"] = [p for p in self.gc_pauses if p["ms"] >= 1.0 or p["generation"] == 2]
        out["gc_pause_ms_total"] = round(sum(p["ms"] for p in self.gc_pauses), 2)
        return out


class GpuClockSampler:
    """`nvidia-smi` sampling the device every `interval_ms` while the window runs: SM clock, board power, and whether
    the power cap was holding the clock back (clocks event reason bit 0x4). On the H200 both frameworks' steps run
    at the 700 W cap, so the clock a run got explains part of its speed. Nothing off CUDA or without nvidia-smi."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
    POWER_CAP_BIT = 0x4

    def __init__(self, command: list[str] | None):
        self.command = command  # None: no sampling
        self.process: Any = None
        self._reader: Any = None
        self.lines: list[str] = []

    @classmethod
    def for_device(cls, device: torch.device, interval_ms: int = 100) -> "GpuClockSampler":
        if device.type != "cuda":
            return cls(None)
        return cls(["nvidia-smi", f"--query-gpu={cls.QUERY}", "--format=csv,noheader,nounits",
                    f"--loop-ms={interval_ms}", *_nvidia_smi_id(device)])

    def __enter__(self) -> "GpuClockSampler":
        if self.command is not None:
            try:
                self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                text=True)
            except OSError:  # no nvidia-smi here: the run goes on without clock samples
                self.process = None
            else:  # drained as it writes: a pipe left unread fills after a few minutes and stalls the sampler
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def __exit__(self, *exc: Any) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # nvidia-smi's own stop (Ctrl-C); what it wrote is kept
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=3)

    def summary(self) -> dict[str, Any] | None:
        """{"samples", "sm_clock_mhz": {"median", "min", "max"}, "power_w_median", "power_capped_share"}, or None
        without samples."""
        return summarize_clock_samples(self.lines)


def summarize_clock_samples(lines: Sequence[str]) -> dict[str, Any] | None:
    clocks, powers, capped = [], [], 0
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            clock, power, reasons = float(parts[0]), float(parts[1]), int(parts[2], 16)
        except ValueError:  # a header, "[N/A]" or an error line
            continue
        clocks.append(clock)
        powers.append(power)
        capped += bool(reasons & GpuClockSampler.POWER_CAP_BIT)
    if not clocks:
        return None
    clocks_sorted, powers_sorted = sorted(clocks), sorted(powers)
    return {
        "samples": len(clocks),
        "sm_clock_mhz": {"median": clocks_sorted[len(clocks) // 2], "min": clocks_sorted[0], "max": clocks_sorted[-1]},
        "power_w_median": powers_sorted[len(powers) // 2],
        "power_capped_share": round(capped / len(clocks), 3),
    }


def _nvidia_smi_id(device: torch.device) -> list[str]:
    """`--id=<PCI bus id>` of a CUDA device (CUDA's numbering can differ from nvidia-smi's); [] when unknown."""
    if device.type != "cuda":
        return []
    try:
        props = torch.cuda.get_device_properties(device)
        return [f"--id={props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"]
    except (AttributeError, RuntimeError):
        return []


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated bytes since `reset_peak` in GiB; None on the CPU (the process peak cannot be reset)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def peak_reserved_gib(device: torch.device) -> float | None:
    """Peak bytes the caching allocator held since `reset_peak` in GiB (what the device gave the process: blocks
    freed while a side stream still reads them count as free in `peak_gib`, not here); None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30


def allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**30


def free_memory(device: torch.device, *, reset_compiler: bool = True) -> None:
    """Drop what the previous run left: Python garbage, compiled graphs (they hold parameters), cached blocks."""
    gc.collect()
    if reset_compiler:
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - best effort between runs
            pass
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_context_broken(device: torch.device) -> str | None:
    """After a failure: a sticky CUDA error (e.g. illegal memory access) poisons the whole process."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def short_error(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in first.lower():
        return f"OOM: {first[:limit]}"
    return f"{type(err).__name__}: {first[:limit]}"


class Deadline:
    """A wall-clock budget for the whole script: runs check it and stop or skip instead of overrunning."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        env["transformers"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["torchao"] = version("torchao")
    except Exception:  # noqa: BLE001 - float8 variants only
        env["torchao"] = None
    return env


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Write atomically (tmp then rename), so a run killed mid-write leaves the previous complete file."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


RESULTS_MARKER = "=== RESULTS ==="
