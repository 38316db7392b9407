"""One run per output folder: a live holder is named and refused, a dead one's lock is taken over, and an
earlier run's checkpoints are never pruned by a `checkpoint.resume = false` start (issue 18's probe table)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.checkpoint.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock, claim_output_dir
from posttrain.config.sections import CheckpointSection

REPO = Path(__file__).resolve().parents[2]


def _write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started_at": "then", "job_id": None} | holder))
    return path


def test_a_live_run_holds_the_folder_and_is_named(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=other.pid, started_at="2026-01-01T00:00:00")
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {other.pid} on host \S+, started 2026"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"process {dead.pid} is not running" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_another_hosts_lock_is_refused_while_fresh_and_taken_over_once_stale(tmp_path: Path) -> None:
    path = _write_lock(tmp_path, host="some-other-node", pid=4242)
    with pytest.raises(SystemExit, match="pid 4242 on host some-other-node"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def _fake_checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "checkpoint.json").write_text("{}")
    return folder


def test_resume_false_into_a_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path: Path, caplog) -> None:
    kept = _fake_checkpoint(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match=r"checkpoint.resume = false, but .* holds checkpoints of an earlier run \(steps 4\)"):
        claim_output_dir(tmp_path, CheckpointSection(resume=False), is_main=True)
    assert kept.is_dir() and not (tmp_path / LOCK_FILE).exists()  # nothing touched, the lock let go

    with caplog.at_level(logging.WARNING):
        lock = claim_output_dir(tmp_path, CheckpointSection(resume=False, overwrite=True), is_main=True)
    assert not kept.exists() and not (tmp_path / "metrics.jsonl").exists()
    assert "deleting the earlier run's checkpoints" in caplog.text
    lock.release()


@pytest.mark.integration  # a train.py process (~15 s on a busy 2-core machine)
def test_a_second_train_py_into_a_locked_folder_exits_naming_the_first(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from posttrain.checkpoint.run_lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "train.py", "--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path)],
            capture_output=True, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode != 0
    last = second.stderr.strip().splitlines()[-1]
    assert f"in use by another run (pid {holder.pid} on host" in last and "Traceback" not in second.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
