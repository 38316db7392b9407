"""End-to-end SFT through `train.py`: exact resume after SIGKILL, HF export, torchrun with FSDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

SMALL = [
    "--config", "train_configs/debug_sft.toml",
    "--training.seq_len", "128",
    "--training.batch_size", "4",
    "--metrics.log_freq", "1",
    "--metrics.tensorboard", "false",
    "--lr_scheduler.warmup_steps", "2",
]


def _train_cmd(out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "train.py"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port", str(_free_port()), "train.py"]
    return [*launcher, *SMALL, "--job.output_dir", str(out), *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


REFERENCE_STEPS = ["--training.steps", "8", "--checkpoint.interval", "2", "--checkpoint.keep_last", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run (whole batches, HF export), shared for CI time: the SIGKILL test's
    reference losses, the micro-batch test's whole-batch losses, and the export test's HF folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_train_cmd(out, *REFERENCE_STEPS, "--checkpoint.export_hf", "true"))
    return out


def test_sigkill_then_restart_reproduces_uninterrupted_losses(tmp_path: Path, reference: Path) -> None:
    steps = REFERENCE_STEPS

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, *steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, "the run ended before its step-4 checkpoint appeared"
        assert time.time() < deadline, "no step-4 checkpoint within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _losses(killed)
    assert max(before) < 8, "the run finished before it was killed; the test proves nothing"

    _run(_train_cmd(killed, *steps))
    resumed, expected = _losses(killed), _losses(reference)
    assert sorted(resumed) == list(range(1, 9))
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6), f"step {step}: {resumed[step]} vs {loss}"


def test_micro_batches_do_not_change_the_losses(tmp_path: Path, reference: Path) -> None:
    """The same global batch in 1 or 4 micro-batches: a token-weighted mean, so the same training curve (the
    whole-batch run is the shared reference: micro_batch_size 0 = the batch of 4 in one forward)."""
    split = tmp_path / "split"
    _run(_train_cmd(split, *REFERENCE_STEPS, "--checkpoint.save_final", "false", "--training.micro_batch_size", "1"))
    a, b = _losses(reference), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_export_hf_loads_in_transformers(reference: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import load_hf

    out = reference
    hf_dir = out / "hf"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok.encode("What is 12 + 7?")])
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ours = load_hf(hf_dir).eval()
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert (out / "tb").is_dir() is False  # tensorboard was switched off for these runs


FSDP_STEPS = ["--training.steps", "3", "--training.micro_batch_size", "1"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-rank FSDP run (two micro-batches per rank, gradients reduced after each), shared for CI time: the
    torchrun test's run and the deferred-sync test's reference."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _run(_train_cmd(out, *FSDP_STEPS, "--checkpoint.export_hf", "true", nproc=2), timeout=300)
    return out


def test_torchrun_two_ranks_fsdp(fsdp_run: Path) -> None:
    out = fsdp_run
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    assert (out / "checkpoints" / "step-3").is_dir()
    assert (out / "hf" / "config.json").is_file()


def test_deferred_gradient_sync_gives_the_same_losses(tmp_path: Path, fsdp_run: Path) -> None:
    """FSDP with gradient accumulation: reducing once after the last micro-batch changes nothing numerically."""
    deferred = tmp_path / "deferred"
    _run(_train_cmd(deferred, *FSDP_STEPS, "--checkpoint.save_final", "false", "--parallelism.defer_grad_sync", "true",
                    nproc=2), timeout=300)
    a, b = _losses(fsdp_run), _losses(deferred)
    assert sorted(a) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
