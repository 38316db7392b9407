"""Tagging every process a test starts (through its environment) so that all of them can be found and killed
by pid, whatever sessions torchrun or data loaders put them in."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

TAG_VAR = "POSTTRAIN_TEST_PROCESS_TAG"


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return []


def tagged_pids(tag: str, var: str = TAG_VAR) -> list[int]:
    """Every live process (not a zombie) whose environment holds var=tag."""
    needle = f"{var}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or needle not in _environ(int(entry.name)):
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def kill_tagged(tag: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process carrying `tag`, by pid, until none is left; returns any still alive."""
    deadline = time.time() + timeout
    while (pids := tagged_pids(tag)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return tagged_pids(tag)


def wait_until_none_left(tag: str, timeout: float = 10.0) -> list[int]:
    """Wait for the tagged processes to end by themselves; returns those still alive after `timeout`."""
    deadline = time.time() + timeout
    while (left := tagged_pids(tag)) and time.time() < deadline:
        time.sleep(0.1)
    return left


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
