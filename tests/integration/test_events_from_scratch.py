"""A transformer trained from scratch on synthetic event IDs with no tokenizer learns the structure:
held-out next-event accuracy far above the frequency baseline and above the bigram baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.evaluation.next_event import next_event_report, read_sequences
from posttrain.models import load_hf

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
EVENTS = REPO / "tests" / "assets" / "events"


def test_from_scratch_token_model_beats_the_baselines_without_a_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "train_configs/debug_events_from_scratch.toml",
           "--job.output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a model this small runs fastest on one thread
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    run_config = json.loads((out / "config.json").read_text())
    assert run_config["tokenizer"]["path"] == "" and run_config["data"]["format"] == "tokens"
    exported = sorted(p.name for p in (out / "hf").iterdir())
    assert not [name for name in exported if "token" in name], exported  # no tokenizer files anywhere
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == 512

    model = load_hf(out / "hf", dtype=torch.float32, device="cpu")
    report = next_event_report(
        model, read_sequences(str(EVENTS / "train.npy")), read_sequences(str(EVENTS / "eval.jsonl"))
    )
    acc, freq, bigram = (report[k]["recall@1"] for k in ("model", "frequency", "bigram"))
    print(json.dumps(report))
    assert freq < 0.05 and acc > 10 * freq, report  # uniform chance is 1/300
    assert acc > bigram + 0.05, report  # it uses more than the last event: it infers the user's type
    assert report["model"]["recall@5"] > 0.8, report
