"""Checkpoints under torch.distributed: FSDP2 x2 (gloo, CPU) resume is exact, and a checkpoint saved
under FSDP x2 loads into one plain process (resharding)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from posttrain.config.sections import CheckpointSection

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _ckpt_worker  # noqa: E402

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(HERE / "_ckpt_worker.py"), "--out", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


def assert_same(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One uninterrupted FSDP x2 run of 6 steps saving at 3 and 6, then a fresh run resuming from step 3."""
    out = tmp_path_factory.mktemp("ckpt_fsdp")
    torchrun(out, "--tag", "full", "--steps", "6", "--save-at", "3", "6")
    torchrun(out, "--tag", "resumed", "--steps", "6", "--resume-step", "3")
    return out


def test_fsdp_resume_matches_uninterrupted_run(runs):
    for rank in range(2):
        full = json.loads((runs / f"losses_rank{rank}_full.json").read_text())
        resumed = json.loads((runs / f"losses_rank{rank}_resumed.json").read_text())
        assert list(resumed) == ["4", "5", "6"]
        assert resumed == {step: full[step] for step in resumed}  # exact float equality
    final_full = torch.load(runs / "final_full.pt", weights_only=False)
    final_resumed = torch.load(runs / "final_resumed.pt", weights_only=False)
    assert_same(final_resumed, final_full)


def test_fsdp_checkpoint_loads_in_one_process(runs):
    model = _ckpt_worker.make_model()
    optimizer, scheduler = _ckpt_worker.make_optimizer(model)
    state = {
        "model": ModelOptimizerState(model, optimizer),
        "scheduler": scheduler,
        "dataloader": _ckpt_worker.RankLoader(0),
        "rng": RNGState(),
    }
    manager = CheckpointManager(CheckpointSection(), runs)
    assert manager.latest_step() == 6
    with pytest.warns(UserWarning, match="saved with world size 2"):
        assert manager.load(state) == 6
    assert scheduler.last_epoch == 6  # shared state survives the change of world size
    assert state["dataloader"].position == 0  # per-rank state does not

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    saved = torch.load(runs / "final_full.pt", weights_only=False)
    assert_same(model_sd, saved["model"], "model")
    assert_same(optim_sd, saved["optim"], "optim")
