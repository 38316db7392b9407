"""End-to-end DPO and distillation through `train.py` on the debug configs, shortened for CI: DPO lifts reward
accuracy from chance to above 0.8; distilling an SFT'd teacher at least halves the student-teacher KL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

QUIET = ["--metrics.tensorboard", "false", "--metrics.log_freq", "1", "--checkpoint.save_final", "false"]


def _train(config: str, out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "train.py", "--config", config, "--job.output_dir", str(out), *QUIET, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_debug_dpo_raises_reward_accuracy_from_chance_above_0_8(tmp_path: Path) -> None:
    # Shortened for CI: a quarter of the rows per step and of the pairs (seen ~5 times instead of ~7).
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((REPO / "tests/assets/preference.jsonl").read_text().splitlines(keepends=True)[:32]))
    rows = _train(
        "train_configs/debug_dpo.toml", tmp_path / "dpo", "--data.path", str(pairs), "--data.eval_path", "",
        "--training.steps", "30", "--training.seq_len", "256", "--training.batch_size", "2", "--optimizer.lr", "3e-3",
    )
    train = [r for r in rows if r.get("loss") is not None]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[0]["reward_accuracy"] == pytest.approx(0.5)  # policy == reference: every reward is 0
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    last = train[-6:]
    accuracy = sum(r["reward_accuracy"] * r["target_tokens"] for r in last) / sum(r["target_tokens"] for r in last)
    assert accuracy > 0.8, [round(r["reward_accuracy"], 2) for r in train]
    assert last[-1]["reward_margin"] > 0


def test_debug_distill_halves_student_teacher_kl(tmp_path: Path) -> None:
    sft = ["--training.steps", "12", "--training.seq_len", "256", "--training.batch_size", "2",
           "--lr_scheduler.warmup_steps", "2", "--checkpoint.export_hf", "true"]
    _train("train_configs/debug_sft.toml", tmp_path / "teacher", *sft)
    rows = _train(
        "train_configs/debug_distill.toml", tmp_path / "student",
        "--distill.teacher_hf_path", str(tmp_path / "teacher" / "hf"),
        "--training.steps", "10", "--training.seq_len", "256", "--training.batch_size", "2",
    )
    kl = [r["kl"] for r in rows]
    assert len(kl) == 10 and kl[0] > 0.5  # the SFT'd teacher is far from the random student
    assert kl[-1] < 0.5 * kl[0], kl


def test_reward_model_trains_and_exports_a_transformers_sequence_classifier(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from posttrain.datasets.preference import load_preference_pairs
    from posttrain.datasets.tokenizer import HFTokenizer

    lines = (REPO / "tests/assets/preference.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:32]))
    (tmp_path / "eval.jsonl").write_text("".join(lines[32:48]))
    out = tmp_path / "rm"
    rows = _train(
        "train_configs/debug_dpo.toml", out, "--job.recipe", "reward_model",
        "--data.path", str(tmp_path / "train.jsonl"), "--data.eval_path", str(tmp_path / "eval.jsonl"),
        "--training.steps", "16", "--training.seq_len", "256", "--training.batch_size", "2",
        "--optimizer.lr", "3e-3", "--checkpoint.export_hf", "true",
    )
    train = [r for r in rows if r.get("loss") is not None]
    assert len(train) == 16 and all(0.0 <= r["reward_accuracy"] <= 1.0 for r in train)
    final_eval = [r for r in rows if "eval_reward_accuracy" in r][-1]

    model = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    assert type(model).__name__ == "Qwen3ForSequenceClassification" and model.config.num_labels == 1
    tok = HFTokenizer(out / "hf")
    pairs, _ = load_preference_pairs(str(tmp_path / "eval.jsonl"), tok, seq_len=256)
    wins = 0.0
    with torch.no_grad():
        for p in pairs:  # both answers in one right-padded batch: HF reads each score at its last real token
            n = max(len(p.chosen_ids), len(p.rejected_ids))
            ids = torch.full((2, n), tok.pad_id)
            ids[0, : len(p.chosen_ids)] = torch.from_numpy(p.chosen_ids)
            ids[1, : len(p.rejected_ids)] = torch.from_numpy(p.rejected_ids)
            chosen, rejected = model(ids, attention_mask=(ids != tok.pad_id).long()).logits[:, 0].tolist()
            wins += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    assert wins / len(pairs) == pytest.approx(final_eval["eval_reward_accuracy"])


def test_dpo_resumes_exactly_from_a_checkpoint(tmp_path: Path) -> None:
    import shutil

    args = ["--training.steps", "6", "--checkpoint.interval", "3", "--checkpoint.keep_last", "0",
            "--checkpoint.save_final", "true", "--training.seq_len", "256", "--training.batch_size", "2",
            "--data.eval_path", ""]
    full = _train("train_configs/debug_dpo.toml", tmp_path / "full", *args)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-6")  # as if killed after step 3's checkpoint
    resumed = _train("train_configs/debug_dpo.toml", tmp_path / "resumed", *args)
    assert [(r["step"], r["loss"], r["reward_margin"]) for r in resumed] == [
        (r["step"], r["loss"], r["reward_margin"]) for r in full
    ]
