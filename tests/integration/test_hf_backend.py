"""The Hugging Face fallback backend end to end through `train.py`: a Mistral-shaped random model that posttrain
has no native port of trains with FSDP x2 under torchrun, resumes exactly from a checkpoint, and exports a
folder transformers loads; the native backend refuses the same model, naming its type."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _tiny_mistral(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=2048,  # >= the test tokenizer's 1437 tokens
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, hf_dir: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "train.py"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port", str(_free_port()), "train.py"]
    cmd = [
        *launcher, "--config", "train_configs/debug_sft.toml",
        "--model.backend", "hf", "--model.hf_path", str(hf_dir), "--tokenizer.path", "tests/assets/tokenizer",
        "--data.path", "tests/assets/chat.jsonl",
        "--training.seq_len", "128", "--training.batch_size", "4", "--metrics.log_freq", "1",
        "--metrics.tensorboard", "false", "--lr_scheduler.warmup_steps", "2", "--job.output_dir", str(out), *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def test_hf_backend_fsdp_trains_resumes_exactly_and_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = _tiny_mistral(tmp_path / "mistral")
    steps = ["--training.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep_last", "0",
             "--activation_checkpoint.mode", "full"]
    full = tmp_path / "full"
    _ok(_train(full, hf_dir, *steps, "--checkpoint.export_hf", "true", nproc=2))
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1] - 0.05, losses  # it learns
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is None for r in rows)  # no peak FLOP/s on a CPU

    # Restart from the uninterrupted run's step-2 checkpoint: steps 3 and 4 come out the same.
    restarted = tmp_path / "restarted"
    shutil.copytree(full / "checkpoints" / "step-2", restarted / "checkpoints" / "step-2")
    proc = _ok(_train(restarted, hf_dir, *steps, nproc=2))
    assert "resumed" in proc.stdout + proc.stderr
    resumed = _losses(restarted)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6), (step, resumed[step], losses[step])

    # The export is a Mistral folder transformers loads, with the tokenizer, holding the trained weights.
    export = full / "hf"
    assert json.loads((export / "config.json").read_text())["model_type"] == "mistral"
    tok = AutoTokenizer.from_pretrained(export)
    trained = AutoModelForCausalLM.from_pretrained(export).eval()
    initial = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tok.encode("What is 12 + 7?")])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, initial(input_ids=ids).logits
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


def test_native_backend_refuses_the_model_type_by_name(tmp_path: Path) -> None:
    hf_dir = _tiny_mistral(tmp_path / "mistral")
    proc = _train(tmp_path / "native", hf_dir, "--model.backend", "native", "--training.steps", "1")
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert "'mistral'" in message and 'model.backend = "hf"' in message, message[-2000:]
    assert "Traceback" not in message, message[-2000:]
