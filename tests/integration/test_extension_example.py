"""The examples/event_two_tower extension trains through train.py from its own package: model family,
loss, data format and recipe all named by import path in its config, nothing changed inside posttrain/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "event_two_tower"
pytestmark = pytest.mark.integration


def test_event_two_tower_example_trains_both_heads_through_its_own_package(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", str(EXAMPLE / "config.toml"), "--job.output_dir", str(out),
           "--training.steps", "60"]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0], rows[-1]
    assert last["step"] == 60 and {"event_ce", "category_ce", "category_acc"} <= set(last)  # the user's loss
    assert last["event_ce"] < first["event_ce"] - 2 and last["category_ce"] < first["category_ce"] - 1
    assert last["data/trained_tokens"] == last["data/tokens"] - 2 * last["data/samples"]  # 2 cold-start events

    report = json.loads((out / "next_event_eval.json").read_text())  # written by the user's recipe
    assert report["model"]["recall@1"] > 10 * report["frequency"]["recall@1"], report
    assert report["model"]["category_accuracy"] > 0.4, report  # 10 categories: chance is about 0.1

    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode != 0 and "event_ext" in proc.stderr and "PYTHONPATH" in proc.stderr
