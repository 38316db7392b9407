"""Run commands (plain or torchrun) side by side and leave no process behind, pass or fail.

torchrun starts its workers in their own sessions, so killing torchrun's process group misses them. Every
process started here inherits a unique tag in its environment (``_process_tags.py``); when the runs end (or
time out, or the test fails) every process carrying the tag is killed by pid and waited for.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _process_tags import TAG_VAR, kill_tagged

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` on a free local port, then ``args`` (a script and its arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *args]


def _reap(tag: str, procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
    kill_tagged(tag)
    for proc in procs:
        proc.wait()


def run_side_by_side(cmds: list[list[str]], *, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start every command at once (cwd: the repository, OMP_NUM_THREADS=1), wait for all, reap them all.
    Returns their CompletedProcess (stdout and stderr together in ``stdout``) in order."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", **{TAG_VAR: tag},
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs: list[subprocess.Popen] = []
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]  # files, not pipes: no run blocks on a full pipe
    try:
        for cmd, log in zip(cmds, logs):
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        deadline = time.time() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        _reap(tag, procs)
    results = []
    for cmd, proc, log in zip(cmds, procs, logs):
        log.seek(0)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, log.read(), ""))
        log.close()
    return results


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(map(str, result.args))}\n(exit {result.returncode}):\n{result.stdout[-5000:]}"
