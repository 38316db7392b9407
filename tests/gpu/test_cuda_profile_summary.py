"""bench_sft's profile summary counts every device operation the profiler recorded: on the H200 the summary
once read `prof.events()`, which dropped ~110 launches a Llama-3.2-1B step (no CPU operator to tie them to) and
showed them as idle gaps. Here a compiled norm + projection runs forward and backward under the profiler, and the
summary's operations must be the exported trace's, one for one."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from profile_summary import device_activities, profile_steps, summarize, write_profile  # noqa: E402


def test_summary_sees_every_device_operation_of_the_trace(device: torch.device, tmp_path: Path,
                                                          record_property) -> None:
    if device.type != "cuda":
        pytest.skip("device operations exist on CUDA only")
    x = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    proj = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)

    @torch.compile
    def block(x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w
        return x + normed @ proj

    def step() -> None:
        block(x).float().square().mean().backward()

    step()  # compile outside the window
    prof, wall_s = profile_steps(step, 2, device)
    summary = summarize(prof, wall_s, 2)
    files = write_profile(prof, summary, "block", tmp_path, "block", max_trace_mib=64)
    trace = json.load(gzip.open(files[1]))["traceEvents"]
    in_trace = Counter(e["name"] for e in trace if e.get("ph") == "X"
                       and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"))
    in_summary = Counter(name for _, _, name in device_activities(prof))
    record_property("operations", f"summary {sum(in_summary.values())}, trace {sum(in_trace.values())}; "
                                  f"prof.events() {sum(1 for e in prof.events() if e.device_type.name == 'CUDA')}")
    assert in_summary == in_trace
    assert summary["kernels_per_step"] * 2 == sum(in_trace.values())
