"""benchmarks/bench_moe.py on the CPU with tiny shapes (the GPU numbers are in BENCHMARKS.md), and the
experts' explicit path switch it relies on (moe.EXPERTS_PATH)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models.common import moe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_moe  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("path", moe.EXPERTS_PATHS)
def test_experts_path_switch_picks_the_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe, "EXPERTS_PATH", path)
    x = torch.randn(10, 8)
    expected = {"grouped": True, "loop": False, "auto": moe.grouped_mm_supported(x)}[path]
    assert moe.ExpertGroups(x, torch.tensor([4, 0, 6])).grouped is expected


def test_an_unknown_experts_path_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe, "EXPERTS_PATH", "fast")
    with pytest.raises(ValueError, match="EXPERTS_PATH is 'fast'"):
        moe.use_grouped_mm(torch.randn(2, 8))


def test_bench_moe_runs_both_paths_with_and_without_expert_lora(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = []
    real = moe.use_grouped_mm
    monkeypatch.setattr(moe, "use_grouped_mm", lambda x: taken.append(real(x)) or taken[-1])
    out = tmp_path / "moe.json"
    assert bench_moe.main(["--shapes", "qwen3_moe:debug:1,gpt_oss:debug:2", "--seq-len", "32", "--batch", "2",
                           "--steps", "1", "--warmup", "1", "--dtype", "float32", "--device", "cpu",
                           "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["shape"].split()[0], r["lora"], r["path"]) for r in results] == [
        (family, lora, path) for family in ("qwen3_moe", "gpt_oss") for lora in ("off", "experts")
        for path in ("grouped", "loop")
    ]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in results), results
    assert True in taken and False in taken and moe.EXPERTS_PATH == "auto"
    table = capsys.readouterr().out.split("=== RESULTS ===")[1]
    assert table.count("| ok (1 steps) |") == 8


def test_bench_moe_refuses_a_dense_family() -> None:
    with pytest.raises(SystemExit, match="not a mixture-of-experts family"):
        bench_moe.parse_shapes("qwen3:0.6B:2")
