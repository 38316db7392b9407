"""The tier's own harness under pytest-xdist: a worker that finishes must not take the others down.

tests/conftest.py kills, at session end, processes the tests left running, found by a variable every process
of the session inherits. xdist's workers inherit it as well, so each worker that finished used to kill every
worker still running a test ("worker 'gwN' crashed" in waves on the H200, 2026-12-02)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _gpu_tier import REPO

TESTS = '''
import time

def test_fast():
    pass

def test_slow():
    time.sleep(6)  # still running when the other worker's session ends
'''


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="pytest-xdist is not installed")
def test_a_finished_worker_leaves_the_others_running(tmp_path: Path) -> None:
    for name in ("conftest.py", "_process_tags.py"):
        shutil.copy(REPO / "tests" / name, tmp_path / name)
    (tmp_path / "test_two.py").write_text(TESTS)
    # a session of its own: inheriting this session's variable, its sweep would reach this session's processes
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_TEST_SESSION" and not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", "test_two.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
