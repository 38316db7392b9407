"""The families of issue 6 under parallelism on two CPU ranks (gloo), against the single-process model:
Qwen3-MoE under FSDP2 (sharded experts, sharded HF loading from per-expert tensors, activation checkpointing,
save_hf from DTensors); Gemma 3 under TP and FSDP+TP; GPT-OSS under FSDP with activation checkpointing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_moe_worker.py")
FAMILIES_WORKER = Path(__file__).with_name("_families_parallel_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(script), *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)


def test_gemma3_tp_and_gpt_oss_fsdp_match_single_process(tmp_path: Path) -> None:
    proc = _torchrun(FAMILIES_WORKER, "families", str(tmp_path))
    if proc.returncode != 0:
        pytest.fail(f"families worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    assert json.loads((tmp_path / "families.json").read_text()) == {"ok": True}


def test_qwen3_moe_fsdp_matches_single_process(tmp_path: Path) -> None:
    from posttrain.models import build_model, save_hf

    torch.manual_seed(0)
    hf_dir = save_hf(build_model("qwen3_moe", "debug", "cpu", vocab_size=1000), tmp_path / "hf_in")
    out = tmp_path / "out"
    proc = _torchrun(WORKER, str(out), str(hf_dir))
    if proc.returncode != 0:
        pytest.fail(f"MoE FSDP worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    result = json.loads((out / "result.json").read_text())
    assert result["max_grad_diff"] < 1e-5
