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


def test_sigkill_then_restart_reproduces_uninterrupted_losses(tmp_path: Path) -> None:
    steps = ["--training.steps", "8", "--checkpoint.interval", "2", "--checkpoint.keep_last", "0"]
    reference = tmp_path / "reference"
    _run(_train_cmd(reference, *steps))

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


def test_micro_batches_do_not_change_the_losses(tmp_path: Path) -> None:
    """The same global batch in 1 or 4 micro-batches: a token-weighted mean, so the same training curve."""
    steps = ["--training.steps", "3", "--checkpoint.save_final", "false"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(_train_cmd(whole, *steps, "--training.micro_batch_size", "4"))
    _run(_train_cmd(split, *steps, "--training.micro_batch_size", "1"))
    a, b = _losses(whole), _losses(split)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_export_hf_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import load_hf

    out = tmp_path / "run"
    _run(_train_cmd(out, "--training.steps", "2", "--checkpoint.export_hf", "true"))
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


def test_torchrun_two_ranks_fsdp(tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    _run(_train_cmd(out, "--training.steps", "3", "--checkpoint.export_hf", "true", nproc=2), timeout=300)
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    assert (out / "checkpoints" / "step-3").is_dir()
    assert (out / "hf" / "config.json").is_file()


def test_deferred_gradient_sync_gives_the_same_losses(tmp_path: Path) -> None:
    """FSDP with gradient accumulation: reducing once after the last micro-batch changes nothing numerically."""
    common = ["--training.steps", "3", "--training.micro_batch_size", "1", "--checkpoint.save_final", "false"]
    every, deferred = tmp_path / "every", tmp_path / "deferred"
    _run(_train_cmd(every, *common, nproc=2), timeout=300)
    _run(_train_cmd(deferred, *common, "--parallelism.defer_grad_sync", "true", nproc=2), timeout=300)
    a, b = _losses(every), _losses(deferred)
    assert sorted(a) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
