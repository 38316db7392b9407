"""A checkpoint written under one parallel layout resumes under another with the same losses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_sft_recipe import REPO, _losses, _run, _train_cmd

pytestmark = pytest.mark.integration

STEPS = ["--training.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep_last", "0"]
FSDP2 = ["--parallelism.dp_shard", "2"]
REPLICATE2 = ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"]
TP2 = ["--parallelism.dp_shard", "1", "--parallelism.tp", "2"]


def _resume_under(reference: Path, out: Path, layout: list[str], nproc: int) -> dict[int, float]:
    """Copy the reference run's step-2 checkpoint into a fresh output_dir and resume it under `layout`."""
    (out / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(reference / "checkpoints" / "step-2"), str(out / "checkpoints")], check=True)
    _run(_train_cmd(out, *STEPS, *layout, nproc=nproc), timeout=300)
    return _losses(out)


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-rank FSDP run with checkpoints at steps 2 and 4, shared by two tests for CI time."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _run(_train_cmd(out, *STEPS, *FSDP2, nproc=2), timeout=300)
    return out


def test_fsdp_checkpoint_resumes_under_replication(tmp_path: Path, fsdp_reference: Path) -> None:
    reference = fsdp_reference
    resumed = _resume_under(reference, tmp_path / "replicated", REPLICATE2, nproc=2)
    expected = _losses(reference)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_tp_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    reference = tmp_path / "tp"
    _run(_train_cmd(reference, *STEPS, *TP2, nproc=2), timeout=300)
    resumed = _resume_under(reference, tmp_path / "single", [], nproc=1)
    expected = _losses(reference)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_changing_the_data_parallel_degree_is_refused_clearly(tmp_path: Path, fsdp_reference: Path) -> None:
    out = tmp_path / "single"  # the two-rank run's step-2 checkpoint, resumed on one process
    (out / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(fsdp_reference / "checkpoints" / "step-2"), str(out / "checkpoints")], check=True)
    proc = subprocess.run(_train_cmd(out, *STEPS), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "data-parallel degree of 2, this run has 1" in proc.stderr + proc.stdout
    assert not (out / "checkpoints" / "step-4").exists()
