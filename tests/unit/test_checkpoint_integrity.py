"""Damaged checkpoints are detected through their manifest and skipped, never silently; async saves
publish only once written and hold the values of the step they were taken at."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState
from posttrain.checkpoint.manager import MARKER_FILE, SHARED_FILE
from posttrain.config.sections import CheckpointSection


def _state(seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    return model, {"model_optimizer": ModelOptimizerState(model, optimizer), "data": {"position": seed}}


def _save_two(tmp_path: Path) -> CheckpointManager:
    manager = CheckpointManager(CheckpointSection(keep_last=0), tmp_path)
    for step in (1, 2):
        manager.save(step, _state(step)[1])
    return manager


def test_manifest_lists_every_file_with_sizes(tmp_path: Path) -> None:
    manager = _save_two(tmp_path)
    files = manager.metadata(2)["files"]
    on_disk = {p.name for p in manager.step_dir(2).iterdir()} - {MARKER_FILE}
    assert set(files) == on_disk and all("size" in e and "sha256" in e for e in files.values())


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path: Path, damage: str, caplog) -> None:
    manager = _save_two(tmp_path)
    latest = manager.step_dir(2)
    tensor_file = next(p for p in latest.iterdir() if p.suffix == ".distcp")
    if damage == "truncate":
        data = tensor_file.read_bytes()
        tensor_file.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (latest / SHARED_FILE).unlink()
    else:
        (latest / "rank_0.pt").write_bytes(b"x" * (latest / "rank_0.pt").stat().st_size)

    model, state = _state(99)
    with caplog.at_level(logging.WARNING):
        assert manager.load(state) == 1
    assert "damaged" in caplog.text and str(latest) in caplog.text
    assert state["data"] == {"position": 1}
    assert torch.equal(model.weight, _state(1)[0].weight)


def test_all_checkpoints_damaged_refuses_to_start_from_scratch(tmp_path: Path) -> None:
    manager = _save_two(tmp_path)
    for step in (1, 2):
        (manager.step_dir(step) / SHARED_FILE).unlink()
    with pytest.raises(SystemExit, match="refusing to start from scratch"):
        manager.load(_state(0)[1])


def test_unfinished_save_is_reported(tmp_path: Path, caplog) -> None:
    manager = _save_two(tmp_path)
    (manager.folder / "step-3.tmp").mkdir()
    with caplog.at_level(logging.WARNING):
        assert manager.load(_state(0)[1]) == 2
    assert "step-3.tmp" in caplog.text and "unfinished" in caplog.text


def test_async_save_publishes_after_wait_with_the_values_at_save_time(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointSection(async_save=True), tmp_path)
    model, state = _state(3)
    saved = model.weight.detach().clone()
    manager.save(5, state)
    assert manager.pending_step == 5
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the save is in flight
    manager.wait()
    assert manager.pending_step is None and manager.latest_step() == 5

    fresh, fresh_state = _state(4)
    assert manager.load(fresh_state) == 5
    assert torch.equal(fresh.weight, saved)


def test_async_save_waits_for_the_previous_one(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointSection(async_save=True, keep_last=0), tmp_path)
    manager.save(1, _state(1)[1])
    manager.save(2, _state(2)[1])  # completes step 1 first: at most one save in flight
    assert manager.complete_steps() == [1] and manager.pending_step == 2
    manager.wait()
    assert manager.complete_steps() == [1, 2]
