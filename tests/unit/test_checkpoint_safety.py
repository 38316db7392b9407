"""Checkpoints that cannot be silently wrong: weights-only loading, content hashes taken while writing and
checked at load, fallback to the previous checkpoint naming folder and file, refusal (never pruning) when
none loads, and a full disk reported by path (issue 18's probe table, checkpoint rows)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from posttrain.checkpoint.hashed_write import HashingFileSystemWriter, write_hashed
from posttrain.checkpoint.manager import MARKER_FILE, _disk_errors_named
from posttrain.config.sections import CheckpointSection


def _state(seed: int, width: int = 16) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Linear(width, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, {"model_optimizer": ModelOptimizerState(model, optimizer), "data": {"position": seed}}


def _save_two(tmp_path: Path, width: int = 16) -> CheckpointManager:
    manager = CheckpointManager(CheckpointSection(keep_last=0), tmp_path)
    for step in (1, 2):
        manager.save(step, _state(step, width)[1])
    return manager


def _rewrite_manifest_entry(directory: Path, name: str) -> None:
    """What an attacker (or a careless copy tool) does: make the manifest agree with the changed file."""
    marker = directory / MARKER_FILE
    metadata = json.loads(marker.read_text())
    data = (directory / name).read_bytes()
    metadata["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker.write_text(json.dumps(metadata))


class _Payload:
    """Pickles to a call of `Path.touch`: loading it with pickle creates the file (it must never run)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_every_file_is_hashed_while_written(tmp_path: Path) -> None:
    digests: dict[str, str] = {}
    _, state = _state(0)
    dcp.save({"model_optimizer": state["model_optimizer"]}, storage_writer=HashingFileSystemWriter(tmp_path, digests))
    write_hashed({"x": torch.arange(5)}, tmp_path / "rank_0.pt", digests)
    on_disk = {p.name for p in tmp_path.iterdir()}
    assert set(digests) == on_disk  # .metadata (written as .metadata.tmp, renamed) included
    for name, digest in digests.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest


def test_pickle_payload_in_rank_file_never_runs_and_falls_back(tmp_path: Path, caplog) -> None:
    manager = _save_two(tmp_path)
    latest = manager.step_dir(2)
    ran = tmp_path / "payload_ran"
    torch.save({"data": _Payload(ran)}, latest / "rank_0.pt")
    _rewrite_manifest_entry(latest, "rank_0.pt")

    _, state = _state(99)
    with caplog.at_level(logging.ERROR):
        assert manager.load(state) == 1
    assert not ran.exists()
    assert str(latest) in caplog.text and "rank_0.pt" in caplog.text and "weights-only" in caplog.text
    assert state["data"] == {"position": 1}


def test_bytes_overwritten_inside_a_large_shard_are_caught_and_fall_back(tmp_path: Path, caplog) -> None:
    manager = _save_two(tmp_path, width=50_000)  # ~5 MB of tensor data: above the old 4 MiB hash limit
    latest = manager.step_dir(2)
    shard = next(latest.glob("*.distcp"))
    assert shard.stat().st_size > 4 << 20
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # same size, different bytes in the middle of the tensor data
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    assert shard.stat().st_size == size

    model, state = _state(99, width=50_000)
    with caplog.at_level(logging.ERROR):
        assert manager.load(state) == 1
    assert str(latest) in caplog.text and f"{shard.name} has changed since it was written" in caplog.text
    assert torch.equal(model.weight, _state(1, width=50_000)[0].weight)


def test_a_dcp_read_failure_falls_back_naming_the_folder(tmp_path: Path, caplog) -> None:
    manager = _save_two(tmp_path)
    latest = manager.step_dir(2)
    (latest / ".metadata").write_bytes(pickle.dumps({"not": "dcp metadata"}))
    _rewrite_manifest_entry(latest, ".metadata")  # the hash passes: DCP itself must fail and be caught

    model, state = _state(99)
    with caplog.at_level(logging.ERROR):
        assert manager.load(state) == 1
    assert str(latest) in caplog.text and "damaged and is skipped" in caplog.text
    assert torch.equal(model.weight, _state(1)[0].weight)


def test_no_loadable_checkpoint_refuses_to_start_and_prunes_nothing(tmp_path: Path) -> None:
    manager = _save_two(tmp_path)
    for step in (1, 2):
        (manager.step_dir(step) / MARKER_FILE).unlink()
    with pytest.raises(SystemExit, match=r"none of the 2 checkpoints .* refusing to start from scratch"):
        manager.load(_state(0)[1])
    assert manager.step_folders() == [1, 2]
    assert all(any(manager.step_dir(s).glob("*.distcp")) for s in (1, 2))


def test_rng_state_round_trips_through_weights_only_loading(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointSection(), tmp_path)
    np.random.seed(3)
    torch.manual_seed(3)
    manager.save(1, {"rng": RNGState()})
    expected = (np.random.rand(), torch.rand(1))
    np.random.seed(0)
    torch.manual_seed(0)
    assert manager.load({"rng": RNGState()}) == 1
    assert (np.random.rand(), torch.rand(1)) == expected


def test_disk_full_names_the_file(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(SystemExit, match=r"checkpoint save failed writing /dev/full: No space left on device"):
        with _disk_errors_named(tmp_path):
            write_hashed({"x": torch.zeros(1000)}, Path("/dev/full"), {})

    folder = tmp_path / "step-1.tmp"  # DCP's tensor file lands on a full device
    folder.mkdir()
    (folder / "__0_0.distcp").symlink_to("/dev/full")
    _, state = _state(0)
    with pytest.raises(SystemExit, match=r"writing /\S*/step-1.tmp/__0_0\.distcp: No space left on device") as err:
        with _disk_errors_named(folder):
            dcp.save({"model_optimizer": state["model_optimizer"]}, storage_writer=HashingFileSystemWriter(folder, {}))
    assert "\n" not in str(err.value.code)
