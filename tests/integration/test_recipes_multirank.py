"""The preference and distillation recipes on two CPU ranks (torchrun, gloo, FSDP dp_shard 2) against one rank
fed the same global batches: DPO with a frozen reference model (sharded like the policy), DPO with LoRA (the
reference is the policy with its adapters off), distillation from a larger teacher sharded on its own, and the
reward model, whose export from the sharded run loads in transformers as a sequence classifier.

Same global batch in both layouts:
- preference pairs: rank r owns pairs r, r + 2, ...; with 8 short pairs (~85 tokens) a 512-token row holds a
  rank's 4 pairs and two rows hold all 8, so every step of either layout is one epoch over all 8 pairs (the
  per-epoch order only moves pairs between rows; each pair is its own documents);
- SFT rows (distillation): with `data.packing = padding` and no shuffle buffer a row is one conversation, and
  global row i is rank i % 2's; one rank with two-row micro-batches sees the same rows per step.

Tolerance: both layouts compute in fp32 but sum in other orders (attention over differently placed documents,
FSDP's reduce-scatter of gradients across ranks, chunked losses): about 1e-7 relative. At step 1 (same
weights) losses and metrics must agree to 1e-5 relative; rewards and margins, differences of summed log-probs
in the hundreds, also to 1e-5 absolute. Later steps: DPO and distillation stay within the same bounds (measured
< 1e-6 relative over 3 steps). The reward model at lr 3e-3 drifts more (measured 1.9e-4 relative by step 3;
2.3e-5 between two one-rank runs that differ only in micro-batching): Adam's first steps move each weight by
about lr * g / (|g| + eps), so weights whose gradient is rounding noise near eps move differently; its later
steps get 2e-3. All far below what a wrong batch split or a missing gradient reduction gives (> 1e-2 at step
1). The logged gradient norm is looser (rel 5e-4): the CPU's fp32 norm of a 262k-element gradient (the
embedding) is itself off by up to ~1e-4 relative from the fp64 value, differently for one full tensor and for
two shards (measured: 7.5e-5 vs 3.7e-5). Clipping (max_grad_norm 1) scales the gradients by a
factor carrying that error, which Adam's normalization cancels (up to eps).
Every process these runs start is killed by pid at the end (_reaped_runs.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from _reaped_runs import REPO, check_ok, run_side_by_side, torchrun

pytestmark = pytest.mark.integration

QUIET = ["--metrics.tensorboard", "false", "--metrics.log_freq", "1", "--checkpoint.save_final", "false"]
TWO_RANKS = ["--parallelism.dp_shard", "2"]
LOSS_RTOL, ABS, NORM_RTOL = 1e-5, 1e-5, 5e-4
RM_LATER_RTOL = 2e-3


def _pairs(tmp_path: Path, name: str, lines: slice) -> Path:
    path = tmp_path / name
    path.write_text("".join((REPO / "tests/assets/preference.jsonl").read_text().splitlines(keepends=True)[lines]))
    return path


def _one_and_two_ranks(out: Path, *args: str) -> tuple[list[dict], list[dict]]:
    """The same run on one rank and (side by side) on two ranks with FSDP; their metrics.jsonl rows."""
    one = [sys.executable, "train.py", *args, *QUIET, "--job.output_dir", str(out / "one")]
    two = [*torchrun(2, "train.py"), *args, *QUIET, *TWO_RANKS, "--job.output_dir", str(out / "two")]
    for result in run_side_by_side([one, two]):
        check_ok(result)
    return tuple(
        [json.loads(line) for line in (out / d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        for d in ("one", "two")
    )


def _assert_same_steps(
    one: list[dict], two: list[dict], keys: tuple[str, ...], steps: int, *, later_rtol: float = LOSS_RTOL
) -> None:
    """Per step: the same target count, `keys` within LOSS_RTOL at step 1 (same weights) and `later_rtol`
    after (plus ABS for values that are differences of large log-probs), grad_norm within NORM_RTOL."""
    one = [r for r in one if r.get("loss") is not None]
    two = [r for r in two if r.get("loss") is not None]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, steps + 1))
    for a, b in zip(one, two):
        assert b["target_tokens"] == a["target_tokens"], (a["step"], a["target_tokens"], b["target_tokens"])
        rtol = LOSS_RTOL if a["step"] == 1 else later_rtol
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=ABS), (a["step"], key, a[key], b[key])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=NORM_RTOL), (a["step"], a["grad_norm"], b["grad_norm"])


def _dpo_args(tmp_path: Path) -> list[str]:
    return ["--config", "train_configs/debug_dpo.toml", "--data.path", str(_pairs(tmp_path, "pairs.jsonl", slice(0, 8))),
            "--data.eval_path", "", "--training.steps", "3", "--training.seq_len", "512", "--training.batch_size", "2"]


DPO_KEYS = ("loss", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def test_dpo_fsdp_two_ranks_match_one_rank(tmp_path: Path) -> None:
    one, two = _one_and_two_ranks(tmp_path, *_dpo_args(tmp_path))
    _assert_same_steps(one, two, DPO_KEYS, steps=3)
    assert all(r["target_tokens"] == 8 for r in one)  # every step: all 8 pairs (the unit DPO averages over)
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # it trains: the comparison is not between two idle runs


def test_dpo_lora_reference_two_ranks_match_one_rank(tmp_path: Path) -> None:
    one, two = _one_and_two_ranks(tmp_path, *_dpo_args(tmp_path), "--lora.rank", "8", "--lora.alpha", "16")
    _assert_same_steps(one, two, DPO_KEYS, steps=3)
    assert one[0]["reward_margin"] == 0.0 and one[-1]["reward_margin"] > 0  # adapters off = the reference


def _teacher(folder: Path) -> Path:
    """A larger random Qwen3 (3 layers, wider MLP) with a peaked output distribution, on the test tokenizer."""
    import torch

    from posttrain.datasets.tokenizer import HFTokenizer
    from posttrain.models import build_model, save_hf

    tokenizer_dir = REPO / "tests/assets/tokenizer"
    torch.manual_seed(123)
    teacher = build_model("qwen3", "debug", device="cpu", vocab_size=HFTokenizer(tokenizer_dir).vocab_size,
                          n_layers=3, ffn_dim=512)
    with torch.no_grad():
        teacher.norm.weight.mul_(8.0)  # sharper than a random student's near-uniform predictions
    out = save_hf(teacher, folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def test_distill_with_teacher_sharded_on_its_own_two_ranks_match_one_rank(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "teacher")
    one, two = _one_and_two_ranks(
        tmp_path, "--config", "train_configs/debug_distill.toml", "--distill.teacher_hf_path", str(teacher),
        "--data.packing", "padding", "--data.shuffle_buffer", "0", "--training.steps", "3",
        "--training.seq_len", "256", "--training.batch_size", "2",
    )
    _assert_same_steps(one, two, ("loss", "kl", "divergence", "ce"), steps=3)
    assert one[0]["kl"] > 0.5 and one[-1]["kl"] < one[0]["kl"]


def test_reward_model_two_ranks_matches_one_rank_and_exports_a_sequence_classifier(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from posttrain.datasets.preference import load_preference_pairs
    from posttrain.datasets.tokenizer import HFTokenizer

    eval_pairs = _pairs(tmp_path, "eval.jsonl", slice(32, 40))
    one, two = _one_and_two_ranks(
        tmp_path, *_dpo_args(tmp_path), "--job.recipe", "reward_model", "--data.eval_path", str(eval_pairs),
        "--optimizer.lr", "3e-3", "--checkpoint.export_hf", "true",
    )
    _assert_same_steps(one, two, ("loss", "reward_accuracy", "reward_margin"), steps=3, later_rtol=RM_LATER_RTOL)
    final_eval = [r for r in two if "eval_reward_accuracy" in r][-1]
    assert final_eval["eval_pairs"] == 8

    out = tmp_path / "two" / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen3ForSequenceClassification" and model.config.num_labels == 1
    tok = HFTokenizer(out)
    pairs, _ = load_preference_pairs(str(eval_pairs), tok, seq_len=512)
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
