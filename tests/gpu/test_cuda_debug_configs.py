"""Every ``train_configs/debug_*.toml`` run to completion through ``train.py`` on the tier's device, with its
learning trend (SFT and from-scratch loss falls, DPO reward accuracy rises from chance, distillation KL falls,
GRPO reward rises), and DCP checkpoints on the device: a run resumed from its mid-run checkpoint (sync and async
save) logs the uninterrupted run's losses exactly (with ``training.deterministic``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from _gpu_tier import REPO
from _process_tags import TAG_VAR, kill_tagged, wait_until_none_left

QUIET = ["--metrics.log_freq", "1", "--metrics.tensorboard", "false"]
# each debug config and the test that runs it (debug_grpo_sft is the warm start debug_grpo starts from)
COVERED = {
    "debug_sft": "test_debug_sft_then_distill",
    "debug_distill": "test_debug_sft_then_distill",
    "debug_dpo": "test_debug_dpo",
    "debug_events_from_scratch": "test_debug_events_from_scratch",
    "debug_grpo_sft": "test_debug_grpo",
    "debug_grpo": "test_debug_grpo",
}


def _run(cmd: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    tag = uuid.uuid4().hex  # every process the run starts (Ray's too) carries it, so none is left behind
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, TAG_VAR: tag})
        assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert not wait_until_none_left(tag, timeout=20), "processes left behind by the run"
        return proc
    finally:
        kill_tagged(tag)


def _train(config: str, out: Path, device: torch.device, *extra: str, log: list | None = None) -> dict[int, dict]:
    """Metrics by step (the last row logged for each step: a resumed run logs its steps again); ``log`` gets the
    run's stdout + stderr."""
    proc = _run([sys.executable, "train.py", "--config", f"train_configs/{config}.toml", "--job.output_dir", str(out),
          "--training.device", device.type, *QUIET, *extra])
    if log is not None:
        log.append(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r.get("loss") is not None or "reward_mean" in r or "eval_accuracy" in r}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_every_debug_config_is_covered() -> None:
    configs = {p.stem for p in (REPO / "train_configs").glob("debug_*.toml")}
    assert configs == set(COVERED), f"debug configs without a GPU-tier run: {sorted(configs - set(COVERED))}"
    assert set(COVERED.values()) <= set(globals()), "COVERED names a test that does not exist"


def test_debug_sft_then_distill(tmp_path: Path, device: torch.device, record_property) -> None:
    sft = _train("debug_sft", tmp_path / "sft", device)
    losses = [sft[s]["loss"] for s in sorted(sft)]
    assert sorted(sft) == list(range(1, 151)) and (tmp_path / "sft" / "hf" / "model.safetensors").is_file()
    assert _mean(losses[-10:]) < 0.6 * losses[0], losses[::10]
    distill = _train("debug_distill", tmp_path / "distill", device,
                     "--distill.teacher_hf_path", str(tmp_path / "sft" / "hf"))
    kl = [distill[s]["kl"] for s in sorted(distill)]
    record_property("trend", f"sft loss {losses[0]:.3f} -> {_mean(losses[-10:]):.3f}; kl {kl[0]:.3f} -> {kl[-1]:.3f}")
    assert len(kl) == 40 and kl[0] > 0.5 and kl[-1] < 0.5 * kl[0], kl


def test_debug_dpo(tmp_path: Path, device: torch.device, record_property) -> None:
    m = _train("debug_dpo", tmp_path / "dpo", device)
    train = [m[s] for s in sorted(m) if s > 0 and m[s].get("reward_accuracy") is not None]
    assert [r["step"] for r in train] == list(range(1, 41))
    # policy == reference: every reward is 0 up to rounding (on CUDA the policy's and the reference's bf16
    # forwards differed in the last bits: 0.479 was seen, not the CPU's exact 0.5), so chance
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(train[0]["reward_accuracy"] - 0.5) < 0.15
    last = train[-10:]
    accuracy = _mean([r["reward_accuracy"] for r in last])
    record_property("trend", f"reward accuracy 0.5 -> {accuracy:.3f} (last 10 steps)")
    assert accuracy > 0.8, [round(r["reward_accuracy"], 2) for r in train]


def test_debug_events_from_scratch(tmp_path: Path, device: torch.device, record_property) -> None:
    m = _train("debug_events_from_scratch", tmp_path / "events", device)
    losses = [m[s]["loss"] for s in sorted(m)]
    record_property("trend", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert max(m) == 100 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (GRPO runs through it)")
def test_debug_grpo(tmp_path: Path, device: torch.device, record_property) -> None:
    warm = tmp_path / "warmstart"  # the debug_grpo_sft run, on the device ('auto' picks it)
    _run([sys.executable, "scripts/make_grpo_warmstart.py", "--out-dir", str(warm)])
    m = _train("debug_grpo", tmp_path / "grpo", device, "--model.hf_path", str(warm / "sft" / "hf"),
               "--grpo.prompts", str(warm / "data" / "train.jsonl"),
               "--grpo.eval_prompts", str(warm / "data" / "train.jsonl"))
    last = max(m)  # the config's training.steps (its eval_freq divides it)
    reward = [m[s]["reward_mean"] for s in range(1, last + 1)]
    record_property("trend", f"reward {_mean(reward[:5]):.3f} -> {_mean(reward[-5:]):.3f}; eval accuracy "
                             f"{m[0]['eval_accuracy']:.2f} -> {m[last]['eval_accuracy']:.2f}")
    assert _mean(reward[-5:]) > _mean(reward[:5]), reward
    # The trend asserted here is the sampled reward (30 steps x 64 samples). The greedy eval is recorded, not
    # asserted: it covers the warm start's 20 training prompts, and the GPU warm start is not bit-reproducible, so
    # it is 3-question noise (tier runs at 871bd4a: 0.85 -> 0.70, then 0.70 -> 1.00). The CPU test
    # (tests/integration/test_grpo.py), bit-reproducible, asserts the greedy eval's rise.


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_from_checkpoint_equals_uninterrupted(
    async_save: bool, tmp_path: Path, device: torch.device, record_property
) -> None:
    args = ["--training.steps", "8", "--checkpoint.interval", "4", "--checkpoint.keep_last", "0",
            "--checkpoint.export_hf", "false", "--checkpoint.async_save", str(async_save).lower(),
            "--training.seq_len", "128", "--training.batch_size", "4", "--training.deterministic", "true"]
    full = _train("debug_sft", tmp_path / "full", device, *args)
    assert (tmp_path / "full" / "checkpoints" / "step-4").is_dir() and (tmp_path / "full" / "checkpoints" / "step-8").is_dir()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-8")  # as if stopped after step 4's checkpoint
    log: list[str] = []
    resumed = _train("debug_sft", tmp_path / "resumed", device, *args, log=log)
    assert "resumed from" in log[0] and "step-4" in log[0], log[0][-2000:]
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    diff = max(abs(resumed[s]["loss"] / full[s]["loss"] - 1) for s in range(5, 9))
    record_property("rel_err", f"loss steps 5-8 {diff:.2e}")
    # training.deterministic: bit-identical. Without it, on the H200 steps 7-8 differed by 1e-5 (run 2)
    assert [resumed[s]["loss"] for s in range(5, 9)] == [full[s]["loss"] for s in range(5, 9)], \
        [(resumed[s]["loss"], full[s]["loss"]) for s in range(5, 9)]
