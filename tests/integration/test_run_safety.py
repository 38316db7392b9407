"""Runs that cannot be silently wrong, end to end through `train.py` on the debug model (issue 18's probe
table): resumes that change what may not change are refused in one line, lr / schedule changes take effect,
an earlier run's checkpoints are never pruned, a run ending on a skipped step exports the last checkpoint and
exits non-zero, a dead data worker and a missing DPO eval file are one line naming the data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _nan_last_step_loss
import pytest
import torch

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState
from posttrain.config.sections import CheckpointSection
from posttrain.models import load_hf
from posttrain.optim import lr_multiplier

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TINY = [
    "--config", "train_configs/debug_sft.toml",
    "--training.seq_len", "64", "--training.batch_size", "2", "--data.num_workers", "0",
    "--metrics.tensorboard", "false", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.interval", "2", "--checkpoint.keep_last", "0", "--checkpoint.export_hf", "false",
]


def _train(out: Path, *extra: str) -> None:
    """`train.py` in this process (as users call it): returns normally or raises SystemExit."""
    spec = importlib.util.spec_from_file_location("_posttrain_train_entry", REPO / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.main([*TINY, "--job.output_dir", str(out), *extra])


def _refusal(out: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as refused:
        _train(out, *extra)
    message = str(refused.value.code)
    assert "\n" not in message and refused.value.code not in (0, None)
    return message


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps(out: Path) -> list[int]:
    return CheckpointManager(CheckpointSection(), out).step_folders()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "base"
    _train(out, "--training.steps", "4")
    assert _steps(out) == [2, 4]
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize(
    "change, key",
    [
        (["--model.overrides", "{n_layers = 1}"], "model.overrides.n_layers = null, this run has 1"),
        (["--model.overrides", "{dim = 256, ffn_dim = 1024}"], "model.overrides.dim = null, this run has 256"),
        (["--lora.rank", "4"], "lora.rank = 0, this run has 4"),
        (["--model.name", "llama3"], 'model.name = "qwen3", this run has "llama3"'),
    ],
)
def test_a_resume_that_changes_the_model_is_refused_naming_the_key(run_copy: Path, change, key) -> None:
    before = _metrics(run_copy)
    message = _refusal(run_copy, "--training.steps", "6", *change)
    assert key in message and str(run_copy / "checkpoints" / "step-4") in message and "Missing key" not in message
    assert _steps(run_copy) == [2, 4] and _metrics(run_copy) == before


def test_a_resume_with_another_lr_and_schedule_follows_the_new_config(run_copy: Path) -> None:
    _train(run_copy, "--training.steps", "6", "--optimizer.lr", "1e-5", "--lr_scheduler.decay", "linear")
    rows = {r["step"]: r for r in _metrics(run_copy)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # the lr logged for a step is the one its update used: multiplier(step - 1)
        expected = 1e-5 * lr_multiplier(step - 1, warmup_steps=2, total_steps=6, decay="linear", min_lr_ratio=0.1)
        assert rows[step]["lr"] == pytest.approx(expected, rel=1e-12)
    config = json.loads((run_copy / "config.json").read_text())
    assert config["optimizer"]["lr"] == 1e-5 and config["lr_scheduler"]["decay"] == "linear"


def test_resume_false_into_a_folder_with_checkpoints_is_refused_and_overwrite_starts_over(run_copy: Path) -> None:
    message = _refusal(run_copy, "--training.steps", "2", "--checkpoint.resume", "false")
    assert "holds checkpoints of an earlier run (steps 2, 4)" in message and "--checkpoint.overwrite true" in message
    assert _steps(run_copy) == [2, 4]
    _train(run_copy, "--training.steps", "2", "--checkpoint.resume", "false", "--checkpoint.overwrite", "true")
    assert _steps(run_copy) == [2] and [r["step"] for r in _metrics(run_copy)] == [1, 2]  # one series


def test_checkpoints_without_completion_markers_refuse_to_start_and_are_kept(run_copy: Path) -> None:
    for step in (2, 4):
        (run_copy / "checkpoints" / f"step-{step}" / "checkpoint.json").unlink()
    before = _metrics(run_copy)
    message = _refusal(run_copy, "--training.steps", "6")
    assert "none of the 2 checkpoints" in message and "nothing was deleted" in message
    assert _steps(run_copy) == [2, 4] and _metrics(run_copy) == before


def test_a_nan_on_the_last_step_exports_the_last_checkpoint_and_exits_nonzero(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_nan_last_step_loss, "calls", 0)
    out = tmp_path / "nan"
    message = _refusal(out, "--training.steps", "4", "--training.loss", "_nan_last_step_loss:loss",
                       "--checkpoint.export_hf", "true")
    assert message.startswith("the run ended abnormally") and "last good step 3" in message
    assert _steps(out) == [2]  # no checkpoint of the skipped step
    exported = load_hf(out / "hf")
    from_checkpoint = load_hf(out / "hf")
    CheckpointManager(CheckpointSection(), out).load({"model_optimizer": ModelOptimizerState(from_checkpoint)}, 2)
    exported_state, checkpoint_state = exported.state_dict(), from_checkpoint.state_dict()
    assert all(torch.equal(exported_state[k], checkpoint_state[k]) for k in exported_state)


def test_a_missing_dpo_eval_file_names_data_eval_path(tmp_path: Path) -> None:
    message = _refusal(tmp_path / "dpo", "--job.recipe", "dpo", "--data.path", "tests/assets/preference.jsonl",
                       "--data.eval_path", str(tmp_path / "missing_eval.jsonl"), "--training.steps", "1")
    assert message.startswith("data.eval_path = ") and "missing_eval.jsonl" in message


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_a_killed_data_worker_ends_the_run_with_one_line_naming_the_data(tmp_path: Path) -> None:
    out = tmp_path / "worker"
    cmd = [sys.executable, "train.py", *TINY, "--data.num_workers", "1", "--training.steps", "10000",
           "--checkpoint.interval", "0", "--checkpoint.save_final", "false", "--job.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert workers
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("a data worker reading tests/assets/chat.jsonl died") and "data.max_row_bytes" in last
