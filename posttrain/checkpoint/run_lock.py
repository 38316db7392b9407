"""One run per output folder: `<output_dir>/run.lock`, created exclusively by the run's first rank.

The lock names its holder (pid, host, start time, the scheduler's job id). A second run into the same folder
is refused with a message naming the first. A lock left by a run that died without cleaning up is taken over
with a warning when it is certainly stale: its process is gone from this host, or it belongs to this same
scheduler job (a requeued or restarted job resumes its own folder), or its holder stopped refreshing it
(`STALE_AFTER_S`, for a holder on another host that cannot be asked).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from posttrain.checkpoint.manager import CheckpointManager
from posttrain.config.sections import CheckpointSection

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
REFRESH_S = 60.0
STALE_AFTER_S = 600.0
_JOB_ID_VARS = ("SLURM_JOB_ID",)  # torchrun's rdzv id defaults to "none" for every job: not an id


def _job_id() -> str | None:
    for var in _JOB_ID_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started_at')}"


class RunLock:
    """Hold `<output_dir>/run.lock` until `release()`; refreshed in the background while held."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job_id": _job_id(),
        }
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise SystemExit naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race against another starter re-reads its lock
            if self._create():
                self._start_refresh()
                return
            holder, age_s = self._read()
            reason = self._stale_reason(holder, age_s)
            if reason is None:
                raise SystemExit(
                    f"job.output_dir {self.path.parent} is in use by another run ({_describe(holder)}; lock file "
                    f"{self.path}). Use another job.output_dir, or stop that run; if it is dead, delete the lock file."
                )
            logger.warning("taking over %s from a run that is gone (%s): %s", self.path, _describe(holder), reason)
            self.path.unlink(missing_ok=True)
        raise SystemExit(f"could not take {self.path}: other runs keep creating it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.holder) + "\n")
        return True

    def _read(self) -> tuple[dict[str, Any], float]:
        try:
            holder = json.loads(self.path.read_text())
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, float("inf")
        except (OSError, ValueError):
            return {"pid": None, "host": None, "started_at": "unknown (unreadable lock)"}, 0.0
        return holder, age_s

    def _stale_reason(self, holder: dict[str, Any], age_s: float) -> str | None:
        if not holder:
            return "the lock disappeared"
        if holder.get("host") == self.holder["host"] and holder.get("pid") == self.holder["pid"]:
            return "this process holds it (an earlier trainer that was not closed)"
        if holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int):
            return None if _process_alive(holder["pid"]) else f"process {holder['pid']} is not running"
        if holder.get("job_id") and holder["job_id"] == self.holder["job_id"]:
            return f"it belongs to this job ({holder['job_id']}), restarted"
        if age_s > STALE_AFTER_S:
            return f"not refreshed for {age_s:.0f} s"
        return None

    def _start_refresh(self) -> None:
        def refresh() -> None:
            while not self._stop.wait(REFRESH_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._refresher = threading.Thread(target=refresh, name="run-lock-refresh", daemon=True)
        self._refresher.start()

    def release(self) -> None:
        """Delete the lock if this process still holds it."""
        self._stop.set()
        holder, _ = self._read()
        if holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)


def claim_output_dir(output_dir: str | Path, checkpoint: CheckpointSection, *, is_main: bool) -> RunLock | None:
    """Lock `output_dir` for this run (on the first rank) and settle what a previous run left there: with
    `checkpoint.resume = false`, its checkpoints are refused unless `checkpoint.overwrite`, which deletes them
    and its metrics.jsonl. Every rank raises the same SystemExit when the first rank is refused."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(output_dir)
            lock.acquire()
            _settle_previous_run(Path(output_dir), checkpoint)
        except SystemExit as refused:
            if lock is not None and lock.path.is_file():
                lock.release()
            lock, error = None, str(refused.code)
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SystemExit(error)
    if lock is not None:
        atexit.register(lock.release)  # a run that ends by an exception leaves no lock behind
    return lock


def _settle_previous_run(output_dir: Path, checkpoint: CheckpointSection) -> None:
    if checkpoint.resume:
        return
    manager = CheckpointManager(checkpoint, output_dir)
    steps = manager.step_folders()
    if not steps:
        return
    if not checkpoint.overwrite:
        raise SystemExit(
            f"checkpoint.resume = false, but {manager.folder} holds checkpoints of an earlier run (steps "
            f"{', '.join(map(str, steps))}): this run would prune or overwrite them. Use another job.output_dir, "
            "resume it (checkpoint.resume = true), or pass --checkpoint.overwrite true to delete them."
        )
    logger.warning("checkpoint.overwrite: deleting the earlier run's checkpoints %s and metrics.jsonl in %s",
                   [f"step-{s}" for s in steps], output_dir)
    shutil.rmtree(manager.folder)
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
