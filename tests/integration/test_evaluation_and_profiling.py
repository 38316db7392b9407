"""Evaluation and profiling during an SFT run under torchrun (2 CPU ranks):

- `eval_loss` (every evaluation.freq steps and at the end) equals the token-weighted cross-entropy computed
  directly, in this process, from the exported final weights over the whole held-out file;
- the generation eval of a model whose answers are known (trained to always answer "The answer is 7.")
  scores exactly the prompts whose answer is 7;
- `profiling.*` writes a chrome trace per rank for the chosen step, with aten ops in it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _process_tags import TAG_VAR, kill_tagged

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
EVAL_FILE = REPO / "tests" / "assets" / "chat_eval.jsonl"
SEQ_LEN = 128


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_constant_answer_data(folder: Path) -> tuple[Path, Path]:
    """Training chats that always answer 7, and generation prompts whose answer is 7 (even rows) or 8."""
    rng = random.Random(0)
    train, prompts = folder / "train.jsonl", folder / "prompts.jsonl"
    with open(train, "w") as f:
        for _ in range(200):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": "The answer is 7."}]}) + "\n")
    with open(prompts, "w") as f:
        for i in range(8):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            row = {"prompt": f"What is {a} + {b}?"} if i % 4 else {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}]}
            f.write(json.dumps({**row, "answer": "7" if i % 2 == 0 else "8"}) + "\n")
    return train, prompts


@torch.no_grad()
def _direct_eval_loss(hf_dir: Path, tokenizer_dir: Path) -> float:
    """Sum of token cross-entropies over every target token of EVAL_FILE / their number, from full logits."""
    from posttrain.config.sections import DataSection
    from posttrain.datasets.dataloader import build_eval_dataloader
    from posttrain.datasets.tokenizer import HFTokenizer
    from posttrain.models import load_hf

    model = load_hf(hf_dir).eval()
    loader = build_eval_dataloader(DataSection(eval_path=str(EVAL_FILE), num_workers=0), HFTokenizer(tokenizer_dir),
                                   seq_len=SEQ_LEN, micro_batch_size=4, dp_rank=0, dp_world_size=1)
    total, count = 0.0, 0
    for batch in loader:
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        labels = batch["labels"]
        total += float(F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def test_sft_eval_loss_generation_accuracy_and_profiler_traces(tmp_path: Path, tokenizer_dir: Path) -> None:
    train, prompts = _write_constant_answer_data(tmp_path)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
        "train.py", "--config", "train_configs/debug_sft.toml",
        "--job.output_dir", str(out),
        "--data.path", str(train),
        "--data.eval_path", str(EVAL_FILE),
        "--training.seq_len", str(SEQ_LEN), "--training.batch_size", "4", "--training.steps", "12",
        "--metrics.log_freq", "4", "--metrics.tensorboard", "false",
        "--checkpoint.interval", "0", "--checkpoint.export_hf", "true",
        "--evaluation.freq", "5",
        "--evaluation.generation_path", str(prompts), "--evaluation.generation_freq", "0",
        "--evaluation.max_new_tokens", "12",
        "--profiling.enable", "true", "--profiling.steps", "3",
    ]
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", TAG_VAR: tag})
    try:
        stdout, _ = proc.communicate(timeout=150)
    finally:
        assert not kill_tagged(tag), "processes survived SIGKILL"  # torchrun's workers, their data workers
        proc.wait()
    assert proc.returncode == 0, stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [5, 10, 12]
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert eval_rows[-1]["eval_loss"] == pytest.approx(_direct_eval_loss(out / "hf", tokenizer_dir), rel=1e-5)

    accuracy = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in accuracy] == [12]  # generation_freq 0: at the end only
    assert accuracy[0]["eval_accuracy"] == 0.5 and accuracy[0]["eval_prompts"] == 8

    for rank in (0, 1):
        trace = json.loads((out / "profile" / "step-3" / f"rank-{rank}.trace.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any(n.startswith("aten::") for n in names), sorted(names)[:20]
        assert "aten::mm" in names or "aten::addmm" in names
    assert not (out / "profile" / "step-2").exists() and not (out / "profile" / "step-4").exists()
