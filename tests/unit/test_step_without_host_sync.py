"""The divergence guard without a per-step host read: fused AdamW skips a non-finite step on the device and the
guard counts it later, with the same parameters and counts as the guard that reads every step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.divergence import DivergenceGuard
from posttrain.trainer import LossOutput, Trainer
from sft_data_fakes import random_token_batches


def test_recorded_norms_resolve_to_the_same_counts_as_immediate_checks() -> None:
    norms = [1.0, math.nan, math.inf, 2.0, math.nan]
    now, later = DivergenceGuard(max_consecutive=3), DivergenceGuard(max_consecutive=3)
    for step, n in enumerate(norms, start=1):
        now.step_is_good(step, n)
        later.record(step, torch.tensor(n))
    assert later.skipped_steps == 0 and len(later.pending) == 5  # nothing read yet
    assert later.resolve(up_to_step=2) == [(2, pytest.approx(math.nan, nan_ok=True))]
    assert len(later.pending) == 3
    assert [s for s, _ in later.resolve()] == [3, 5]
    for key in ("skipped_steps", "consecutive", "last_good_step", "last_bad_step"):
        assert getattr(later, key) == getattr(now, key)


def _poisoned_loss(bad_steps: set[int], trainer: Trainer):
    """Mean squared output of the model's logits; NaN on the listed steps (1-based)."""

    def loss_fn(model, batch, n_global) -> LossOutput:
        logits = model(batch["input_ids"])
        loss = logits.float().pow(2).mean() * batch["labels"].numel()
        if trainer.step + 1 in bad_steps:
            loss = loss * float("nan")
        return LossOutput(loss_sum=loss, n_targets=torch.tensor(batch["labels"].numel()))

    return loss_fn


def _run(
    tmp_path: Path, fused: str, logs: list[bool], bad_steps: frozenset[int] = frozenset({2, 3}), extra: tuple = ()
) -> tuple[DivergenceGuard, dict, list[dict]]:
    """(the guard after the steps, the parameters, each step's metrics); the trainer is closed."""
    cfg = load_config(["--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path),
                       "--metrics.tensorboard", "false", "--optimizer.fused", fused, "--training.batch_size", "2",
                       "--training.seq_len", "16", "--training.max_consecutive_bad_steps", "3", *extra])
    trainer = Trainer(cfg)
    try:
        trainer.data_loader = random_token_batches(len(logs))
        loss_fn = _poisoned_loss(set(bad_steps), trainer)
        metrics = []
        for log in logs:
            metrics.append(trainer.train_step(loss_fn, log=log))
            metrics[-1]["pending"] = len(trainer.divergence.pending)
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return trainer.divergence, params, metrics
    finally:
        trainer.close()


def test_fused_optimizer_skips_on_device_and_matches_the_host_checked_guard(tmp_path: Path) -> None:
    logs = [False, False, False, False, True]
    host_guard, host_params, host_metrics = _run(tmp_path / "host", "false", logs)
    guard, params, metrics = _run(tmp_path / "device", "true", logs)
    assert host_metrics[2]["skipped_steps"] == 2 and host_metrics[2]["pending"] == 0
    # the device path read no norm until the logged step, then counted the same two skipped steps
    assert [m["pending"] for m in metrics] == [1, 2, 3, 4, 0]
    assert metrics[2]["skipped_steps"] == 0 and metrics[-1]["skipped_steps"] == 2
    assert (guard.last_good_step, guard.last_bad_step) == (host_guard.last_good_step, host_guard.last_bad_step) == (5, 3)
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, host_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert metrics[-1]["loss"] == pytest.approx(host_metrics[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("guard_steps", ["3", "0"])
def test_clipping_inside_fused_adamw_matches_clip_grad_norm(tmp_path: Path, guard_steps: str) -> None:
    """Fused AdamW clips through its grad_scale (no separate pass over the gradients); the foreach AdamW after
    clip_grad_norm_ must land on the same parameters, with clipping active on every step (norm > 10 x 0.01)."""
    extra = ("--training.max_grad_norm", "0.01", "--training.max_consecutive_bad_steps", guard_steps)
    logs = [False, True, False, True]
    _, ref_params, ref_metrics = _run(tmp_path / "foreach", "false", logs, frozenset(), extra)
    _, params, metrics = _run(tmp_path / "fused", "true", logs, frozenset(), extra)
    assert all(m["grad_norm"] > 0.1 for m in (ref_metrics[1], ref_metrics[3]))  # 10x the limit: clipped
    for step in (1, 3):
        assert metrics[step]["grad_norm"] == pytest.approx(ref_metrics[step]["grad_norm"], rel=1e-4)
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    _, unclipped, _ = _run(tmp_path / "unclipped", "true", logs, frozenset(), ("--training.max_grad_norm", "0"))
    assert any(not torch.allclose(unclipped[n], params[n], rtol=1e-5, atol=1e-6) for n in params)
