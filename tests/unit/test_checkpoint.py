"""CheckpointManager in one process: exact resume, keep_last, completeness, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from posttrain.checkpoint import (
    CheckpointManager,
    ModelOptimizerState,
    RNGState,
    Shared,
    rng_state,
    set_rng_state,
)
from posttrain.checkpoint.manager import MARKER_FILE
from posttrain.config.sections import CheckpointSection


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


class CountingLoader:
    """Stands in for a dataloader: its position is per-rank state; batches also draw from the global RNG."""

    def __init__(self) -> None:
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += 1
        x = torch.randn(5, 8) + self.position
        return x, x[:, :4].sin()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def train_steps(model, optimizer, scheduler, loader, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x, y = loader.next_batch()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def state_of(model, optimizer, scheduler, loader) -> dict:
    return {
        "model": ModelOptimizerState(model, optimizer),
        "scheduler": scheduler,
        "dataloader": loader,
        "rng": RNGState(),
    }


def test_resume_continues_training_bit_exact(tmp_path):
    torch.manual_seed(123)
    model = make_model(0)
    optimizer, scheduler = make_optimizer(model)
    reference = train_steps(model, optimizer, scheduler, CountingLoader(), 6)
    reference_params = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(123)
    model = make_model(0)
    optimizer, scheduler = make_optimizer(model)
    loader = CountingLoader()
    first = train_steps(model, optimizer, scheduler, loader, 3)
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    manager.save(3, state_of(model, optimizer, scheduler, loader))

    # A fresh process would build everything anew, with other weights and RNG draws.
    torch.manual_seed(999)
    model = make_model(1)
    optimizer, scheduler = make_optimizer(model)
    loader = CountingLoader()
    assert CheckpointManager(CheckpointSection(), tmp_path).load(state_of(model, optimizer, scheduler, loader)) == 3
    assert loader.position == 3
    assert scheduler.last_epoch == 3
    second = train_steps(model, optimizer, scheduler, loader, 3)

    assert first + second == reference  # exact float equality
    for got, want in zip(model.parameters(), reference_params):
        assert torch.equal(got, want)


def test_keep_last_deletes_older_checkpoints(tmp_path):
    model = make_model(0)
    manager = CheckpointManager(CheckpointSection(keep_last=2), tmp_path)
    for step in range(1, 6):
        manager.save(step, {"model": model})
    assert manager.complete_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_keep_last_zero_keeps_all(tmp_path):
    manager = CheckpointManager(CheckpointSection(keep_last=0), tmp_path)
    for step in range(1, 5):
        manager.save(step, {"model": make_model(0)})
    assert manager.complete_steps() == [1, 2, 3, 4]


def test_latest_step_ignores_unfinished_and_unmarked_folders(tmp_path):
    manager = CheckpointManager(CheckpointSection(keep_last=0), tmp_path)
    assert manager.latest_step() is None
    assert manager.load({"model": make_model(0)}) is None

    saved = make_model(0)
    manager.save(5, {"model": saved})
    # A save of step 7 that crashed before the rename, with its files half written ...
    unfinished = tmp_path / "checkpoints" / "step-7.tmp"
    unfinished.mkdir()
    (unfinished / "rank_0.pt").write_bytes(b"partial")
    # ... and a step-9 folder without the completion marker.
    unmarked = tmp_path / "checkpoints" / "step-9"
    unmarked.mkdir()
    (unmarked / ".metadata").write_bytes(b"")
    assert manager.latest_step() == 5

    loaded = make_model(1)
    assert manager.load({"model": loaded}) == 5
    for got, want in zip(loaded.parameters(), saved.parameters()):
        assert torch.equal(got, want)
    with pytest.raises(FileNotFoundError, match="complete steps: 5"):
        manager.load({"model": loaded}, step=9)


def test_save_replaces_crashed_save_of_same_step(tmp_path):
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    stale = tmp_path / "checkpoints" / "step-3.tmp"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    manager.save(3, {"model": make_model(0)})
    manager.save(3, {"model": make_model(2)})  # saving an existing step replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]
    assert not (tmp_path / "checkpoints" / "step-3" / "junk").exists()
    assert (tmp_path / "checkpoints" / "step-3" / MARKER_FILE).is_file()
    loaded = make_model(1)
    manager.load({"model": loaded})
    for got, want in zip(loaded.parameters(), make_model(2).parameters()):
        assert torch.equal(got, want)


def test_plain_values_are_returned_in_the_state_dict(tmp_path):
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    manager.save(2, {"tokens_seen": 1234, "note": Shared({"lr": 0.5})})
    state = {"tokens_seen": None, "note": Shared(None)}
    assert manager.load(state) == 2
    assert state["tokens_seen"] == 1234
    assert state["note"].obj == {"lr": 0.5}


def test_load_names_a_missing_entry(tmp_path):
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    manager.save(1, {"model": make_model(0)})
    with pytest.raises(KeyError, match="'dataloader'"):
        manager.load({"model": make_model(0), "dataloader": CountingLoader()})


def test_weights_only_load_from_model_and_optimizer_checkpoint(tmp_path):
    model = make_model(0)
    optimizer, scheduler = make_optimizer(model)
    train_steps(model, optimizer, scheduler, CountingLoader(), 2)
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    manager.save(2, {"model": ModelOptimizerState(model, optimizer)})
    loaded = make_model(1)
    manager.load({"model": ModelOptimizerState(loaded)})
    for got, want in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(got, want)


def test_should_save_on_interval_and_last_step():
    manager = CheckpointManager(CheckpointSection(interval=3, save_final=True), "unused")
    assert [s for s in range(1, 11) if manager.should_save(s, last_step=10)] == [3, 6, 9, 10]
    manager = CheckpointManager(CheckpointSection(interval=0, save_final=False), "unused")
    assert not any(manager.should_save(s, last_step=10) for s in range(1, 11))


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_rng_state_survives_a_checkpoint(tmp_path):
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    torch.manual_seed(7)
    manager.save(1, {"rng": RNGState()})
    expected = torch.rand(4)
    torch.manual_seed(8)
    manager.load({"rng": RNGState()})
    assert torch.equal(torch.rand(4), expected)
