"""Fault tolerance under `torchrun --max-restarts`: a rank killed with SIGKILL mid-run makes torchrun restart
every worker; they resume from the latest complete checkpoint and the per-step losses equal an uninterrupted
run's (CPU, 2 ranks, gloo).

torchrun starts each worker in its own session, and workers fork data-loader processes, so killing torchrun's
process group is not enough: every process of a run carries a tag in its environment, and the test kills
them by pid however it ends, then checks that none is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _process_tags import TAG_VAR, kill_tagged, wait_until_none_left

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

STEPS = 16
INTERVAL = 4
ARGS = [
    "--config", "train_configs/debug_sft.toml",
    "--training.seq_len", "128",
    "--training.batch_size", "4",
    "--training.steps", str(STEPS),
    "--metrics.log_freq", "1",
    "--metrics.tensorboard", "false",
    "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.export_hf", "false",
    "--checkpoint.interval", str(INTERVAL),
    "--checkpoint.keep_last", "0",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
            "--master_port", str(_free_port()), "train.py", *ARGS, "--job.output_dir", str(out)]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    complete_lines = path.read_text().split("\n")[:-1]  # a line being written has no newline yet
    return [json.loads(line) for line in complete_lines if line.strip()]


def _worker_of_rank(torchrun_pid: int, rank: int) -> int:
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        if f"RANK={rank}".encode() in _environ(pid):
            return pid
    raise AssertionError(f"no worker of rank {rank} among torchrun's children {children}")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def test_sigkilled_rank_restarts_and_resumes_to_the_uninterrupted_losses(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_VAR: tag, "OMP_NUM_THREADS": "1"}
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    try:
        # Both runs at once (they share nothing but the CPU): the reference is uninterrupted.
        ref_proc = _start(_torchrun(reference, max_restarts=0), env, tmp_path / "reference.log")
        proc = _start(_torchrun(faulty, max_restarts=1), env, tmp_path / "faulty.log")
        first = faulty / "checkpoints" / f"step-{INTERVAL}" / "checkpoint.json"
        deadline = time.time() + 60
        while not first.is_file():
            assert proc.poll() is None, (tmp_path / "faulty.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGKILL)
        killed_after = max(r["step"] for r in _rows(faulty))
        assert killed_after < STEPS, "the run ended before the kill; make it longer"

        log = _wait(proc, tmp_path / "faulty.log", timeout=90)
        _wait(ref_proc, tmp_path / "reference.log", timeout=30)
        assert "exitcode: -9" in log and "local_rank: 1" in log, log[-4000:]  # torchrun saw the kill ...
        resumed = [line for line in log.splitlines() if "resumed from" in line]
        assert len(resumed) == 2, log[-4000:]  # ... and restarted both ranks from a checkpoint
        resumed_step = int(resumed[0].rsplit(" ", 1)[1])
        assert INTERVAL <= resumed_step <= killed_after

        expected = {r["step"]: r["loss"] for r in _rows(reference)}
        got = {r["step"]: r["loss"] for r in _rows(faulty)}
        assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
        assert got == expected

        # Nothing of the killed attempt outlives it (its data-loader processes die with their rank).
        left = wait_until_none_left(tag)
        assert not left, f"processes left after the runs ended: {left}"
    finally:
        assert not kill_tagged(tag), "processes survived SIGKILL"
