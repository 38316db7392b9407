"""bench_sft's --profile / --memory-snapshot summaries: kernel names measured on the H200 land in the right
category, busy time is the union of overlapping kernels, the allocator replay finds what was live at the peak,
and a real CPU profile goes through summarize / render / write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from profile_summary import (  # noqa: E402
    _union_us,
    device_gaps,
    category_of,
    device_activities,
    live_at_peak,
    profile_steps,
    summarize,
    write_profile,
)


def test_h200_kernel_names_fall_in_their_categories() -> None:
    cases = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1_kernel0_0":
            "attention bwd",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0":
            "attention fwd",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>": "attention bwd",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>": "optimizer",
        "triton_red_fused__to_copy_gather_logsumexp_sub_unsqueeze_0": "loss (log-softmax / CE)",
        "liger_cross_entropy_kernel": "loss (log-softmax / CE)",
        "triton_per_fused__to_copy__unsafe_view_add_div_expand_mul_pow_sum_view_6": "norm (rms)",
        "_swiglu_backward_kernel": "activation (silu/swiglu)",
        "_triton_rope": "rope / cat / neg",
        "ncclDevKernel_AllGather_RING_LL": "communication",
        "Memset (Device)": "copies / memset",
        "triton_poi_fused__unsafe_view_add_5": "other elementwise / reduction",
    }
    for name, category in cases.items():
        assert category_of(name) == category, name


def test_busy_time_is_the_union_of_kernel_intervals() -> None:
    assert _union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_live_at_peak_replays_allocations_and_frees() -> None:
    def frame(line: int) -> list[dict]:
        return [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": "/repo/posttrain/losses/fused_cross_entropy.py", "line": line, "name": "forward"}]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frame(10)},
        {"action": "alloc", "addr": 2, "size": 300, "frames": frame(20)},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 50, "frames": frame(20)},  # peak: 2 + 3 = 350 < 400 before
        {"action": "free_completed", "addr": 2, "size": 300},
    ]
    out = live_at_peak({"device_traces": [trace]})
    assert out["peak_above_start_gib"] * 2**30 == 400
    assert [(r["where"].split(":")[-1], r["blocks"]) for r in out["at_peak"]] == [("20 forward", 1), ("10 forward", 1)]
    assert [b["mib"] * 2**20 for b in out["largest_blocks"]] == [300, 100]
    assert (out["peak_set_by"]["alloc"], out["peak_set_by"]["of"]) == (2, 3)
    assert out["peak_set_by"]["where"].endswith("20 forward")
    # recorded without frames: the sizes still say what was live
    bare = live_at_peak({"device_traces": [[{k: v for k, v in e.items() if k != "frames"} for e in trace]]})
    assert [b["mib"] * 2**20 for b in bare["largest_blocks"]] == [300, 100] and bare["peak_set_by"]["where"] == "?"


def test_cpu_profile_summary_and_files(tmp_path: Path) -> None:
    a = torch.randn(64, 64)

    def step() -> torch.Tensor:
        return (a @ a).relu().sum()

    prof, wall_s = profile_steps(step, 2, torch.device("cpu"))
    summary = summarize(prof, wall_s, 2)
    assert not summary["device_kernels"] and summary["wall_ms"] > 0
    assert {r["name"] for r in summary["top"]} >= {"aten::mm", "aten::relu"}
    assert next(r for r in summary["top"] if r["name"] == "aten::mm")["category"] == "gemm"
    files = write_profile(prof, summary, "tiny", tmp_path, "tiny")
    assert files[0].read_text().startswith("## tiny: 2 profiled steps")
    assert all(f.exists() for f in files) and not (tmp_path / "tiny.trace.json").exists()


def test_device_gaps_bucket_the_idle_time_and_name_the_largest() -> None:
    kernels = [(0, 10, "a"), (12, 20, "b"), (15, 30, "c"), (80, 90, "d"), (300, 310, "e")]
    gaps = device_gaps(kernels, wall_us=400)
    # 2 us (a->b), 50 us (c->d: c ends last, overlapping b), 210 us (d->e)
    assert {k: (v["us"], v["count"]) for k, v in gaps["buckets"].items()} == {
        "< 10 us": (2, 1), "10-100 us": (50, 1), ">= 100 us": (210, 1)}
    assert [(g["us"], g["after"], g["before"], g["at_us"]) for g in gaps["largest"]] == [
        (210, "d", "e", 90), (50, "c", "d", 30), (2, "a", "b", 10)]
    assert gaps["edges_us"] == 400 - 310
    # the gaps of 10 us and more by their neighbours, largest total first
    assert [(g["us"], g["count"], g["after"], g["before"]) for g in gaps["recurring"]] == [
        (210, 1, "d", "e"), (50, 1, "c", "d")]


def test_recurring_gaps_add_up_by_neighbours() -> None:
    # a 20 us gap between "norm" and "mm" at every one of three layers, one 41 us gap elsewhere
    kernels = []
    t = 0.0
    for _ in range(3):
        kernels += [(t, t + 5, "norm"), (t + 25, t + 30, "mm"), (t + 31, t + 40, "silu")]
        t += 41
    kernels.append((t + 40, t + 50, "mm"))
    recurring = device_gaps(kernels, wall_us=t + 50)["recurring"]
    assert (recurring[0]["after"], recurring[0]["before"], recurring[0]["count"]) == ("norm", "mm", 3)
    assert recurring[0]["us"] == pytest.approx(60) and recurring[1]["us"] == pytest.approx(41)  # silu -> mm


def test_activities_come_from_the_profilers_own_records() -> None:
    """The summary reads Kineto's records (prof.events() drops device work it cannot tie to a CPU operator); on a
    CPU the same reader, pointed at the CPU's records, returns the operators with their times, annotations left
    out."""
    from torch.autograd import DeviceType

    a = torch.randn(64, 64)

    def step() -> torch.Tensor:
        with torch.profiler.record_function("step#annotated"):
            return (a @ a).relu().sum()

    prof, _ = profile_steps(step, 2, torch.device("cpu"))
    assert device_activities(prof) == []  # no GPU here
    cpu = device_activities(prof, DeviceType.CPU)
    names = [name for _, _, name in cpu]
    assert names.count("aten::mm") == 2 and "step#annotated" not in names
    assert all(end >= start for start, end, _ in cpu)
