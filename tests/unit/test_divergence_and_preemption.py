"""The divergence guard's skip / stop decisions, the preemption flag under a real signal, and the dry run's
counts against a really built model."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from posttrain.config import load_config
from posttrain.divergence import DivergedError, DivergenceGuard
from posttrain.dry_run import count_parameters, dry_run
from posttrain.models.registry import build_model
from posttrain.preemption import PreemptionFlag


def test_guard_skips_nonfinite_norms_and_resets_on_a_good_step() -> None:
    guard = DivergenceGuard(max_consecutive=3)
    norms = [1.0, math.nan, math.inf, 2.0, math.nan]
    assert [guard.step_is_good(i + 1, n) for i, n in enumerate(norms)] == [True, False, False, True, False]
    assert guard.skipped_steps == 3 and guard.consecutive == 1 and guard.last_good_step == 4
    guard.check_limit(5, lambda step: None)  # 1 in a row: no stop


def test_guard_stops_after_k_in_a_row_naming_step_and_checkpoint() -> None:
    guard = DivergenceGuard(max_consecutive=2)
    asked = []
    for step, norm in enumerate([0.5, float(torch.tensor(float("nan"))), math.inf], start=1):
        guard.step_is_good(step, norm)
    with pytest.raises(DivergedError, match=r"2 consecutive steps up to step 3.*Last good checkpoint: ckpt/step-1"):
        guard.check_limit(3, lambda step: asked.append(step) or "ckpt/step-1")
    assert asked == [1]
    assert DivergedError("x").code == "x"  # a SystemExit: the process exits non-zero with the message


def test_guard_off_never_stops() -> None:
    guard = DivergenceGuard(max_consecutive=0)
    assert not guard.enabled
    guard.check_limit(10, lambda step: None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_flag_is_set_by_a_real_signal(sig: signal.Signals) -> None:
    previous = signal.getsignal(sig)
    flag = PreemptionFlag()
    try:
        assert not flag.stop_requested()
        os.kill(os.getpid(), sig)
        assert flag.stop_requested() and flag.received == sig
    finally:
        flag.restore()
    assert signal.getsignal(sig) == previous


def test_dry_run_counts_match_the_real_model_and_layout(capsys) -> None:
    cfg = load_config(["--config", "train_configs/debug_sft.toml", "--parallelism.tp", "2",
                       "--training.batch_size", "8"])
    plan = dry_run(cfg, world_size=8)
    real = build_model(cfg.model.name, cfg.model.flavor, device="cpu")
    n = sum(p.numel() for p in real.parameters())
    assert plan["parameters"] == {"total": n, "trainable": n, "active": n}
    assert count_parameters(real).total == n
    layout = plan["parallel_layout"]
    assert (layout["dp_shard"], layout["tp"], layout["micro_batch_size"], layout["grad_accum"]) == (4, 2, 2, 1)
    memory = plan["memory_per_gpu_gib"]
    assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"), abs=0.05)
    out = capsys.readouterr().out
    assert "== resolved config ==" in out and "parameters: total" in out and "parallel layout: world 8" in out


def test_signalled_rank_that_never_reaches_a_step_boundary_exits_on_its_own() -> None:
    """The survivor of a dead peer hangs in a collective; after the grace period it leaves with code 143."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, signal, time
        from posttrain.preemption import PreemptionFlag
        flag = PreemptionFlag(min_grace_s=0.5)
        flag.stop_requested(); time.sleep(0.05); flag.stop_requested()   # two step boundaries seen
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)                                                   # "stuck in a collective"
    """)
    t0 = __import__("time").monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 143, proc.stderr
    assert "did not finish within" in proc.stderr and __import__("time").monotonic() - t0 < 25


def test_dry_run_activation_estimate_follows_the_checkpointing_layout() -> None:
    def activations(*overrides: str) -> float:
        # long rows, so that the estimate (rounded to 0.01 GiB) tells the layouts apart on the debug model
        cfg = load_config(["--config", "train_configs/debug_sft.toml", "--training.seq_len", "65536",
                           "--model.overrides", "{n_layers = 4}", *overrides])
        return dry_run(cfg, world_size=1)["memory_per_gpu_gib"]["activations"]

    none, full = activations(), activations("--activation_checkpoint.mode", "full")
    skipped = [activations("--activation_checkpoint.mode", "full", "--activation_checkpoint.skip_last", str(k))
               for k in (1, 2, 3)]
    # the last block is recomputed first under full checkpointing anyway: leaving it unwrapped costs nothing
    assert skipped[0] <= full < skipped[1] < skipped[2] < none
    assert activations("--activation_checkpoint.mode", "selective", "--activation_checkpoint.every_n", "1",
                       "--activation_checkpoint.skip_last", "1") < none
