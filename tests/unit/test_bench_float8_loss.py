"""benchmarks/bench_float8_loss.py and scripts/make_text_tokens.py on the CPU (float8 itself runs on the GPU:
BENCHMARKS.md): real text becomes a token file, two identical bf16 runs of train.py agree exactly, float8 without
compile is refused with its one line, and the tail comparison reads a difference the way it should."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_float8_loss  # noqa: E402


def make_tokens(tokenizer_dir: Path, out: Path, chunk: int, min_tokens: int = 3000) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_text_tokens.py"), "--tokenizer", str(tokenizer_dir),
         "--glob", str(REPO / "posttrain" / "datasets" / "*.py"), "--min-tokens", str(min_tokens),
         "--chunk", str(chunk), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )


def test_text_files_become_chunked_documents_ending_with_eos(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from posttrain.datasets.token_files import index_path

    out = tmp_path / "text.uint16.bin"
    proc = make_tokens(tokenizer_dir, out, chunk=100)
    assert proc.returncode == 0, proc.stderr
    tokens = np.fromfile(out, dtype=np.uint16)
    offsets = np.load(index_path(str(out)))
    lengths = np.diff(offsets)
    assert offsets[-1] == len(tokens) >= 3000
    assert lengths.max() <= 100 and lengths.min() > 0
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    # every file ends with EOS, so the token stream does too, and EOS never sits anywhere but a document's end
    assert tokens[-1] == eos
    file_ends = set((np.flatnonzero(tokens == eos) + 1).tolist())
    assert file_ends <= set(offsets[1:].tolist())
    # pieces of one file overlap by one token (a piece's first token is only context), so every token is a target once
    inner = [end for end in offsets[1:-1].tolist() if end not in file_ends]
    assert inner and all(tokens[end] == tokens[end - 1] for end in inner)


def test_make_text_tokens_refuses_a_file_name_without_room_for_the_ids(tokenizer_dir: Path, tmp_path: Path) -> None:
    proc = make_tokens(tokenizer_dir, tmp_path / "text.uint32.bin", chunk=100)
    assert proc.returncode != 0
    assert "needs a NAME.uint16.bin file" in proc.stderr and "Traceback" not in proc.stderr


def test_two_equal_runs_agree_and_float8_without_compile_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "text.uint16.bin"
    assert make_tokens(tokenizer_dir, tokens, chunk=64).returncode == 0
    out = tmp_path / "result.json"
    # relative --tokens and --work-dir (train.py runs in the repository, not here), the same variant twice
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_float8_loss.py"), "--tokens", tokens.name,
         "--model", "qwen3", "--flavor", "debug", "--vocab-size", "1472", "--seq-len", "64", "--batch", "2",
         "--steps", "4", "--warmup", "1", "--no-compile", "--device", "cpu", "--variants", "bf16,bf16,float8",
         "--tail", "2", "--work-dir", "runs", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # a variant failed: not a pass
    reference, again, float8 = json.loads(out.read_text())["results"]
    assert reference["status"] == again["status"] == "ok"
    assert len(reference["losses"]) == 4 and reference["losses"] == again["losses"]
    assert again["tail_rel_diff"] == 0.0 and again["data_epoch"] == 0 and again["skipped_steps"] == 0
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.log")) == ["0_bf16.log", "1_bf16.log", "2_float8.log"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["0_bf16", "1_bf16"]
    assert float8["status"].startswith("failed (exit 2)")
    assert "training.float8 needs compile.enabled" in float8["status"]
    table = proc.stdout.split(bench_float8_loss.RESULTS_MARKER)[1]
    assert "| bf16 |" in table and "reference again: run-to-run spread" in table and "needs compile.enabled" in table
    assert "run-to-run spread of bf16 (the same config run 2 times): 0.00%" in table
    assert json.loads(out.read_text())["reference_spread"] == 0.0


def test_metrics_reading_counts_skipped_updates_and_leaves_eval_rows_out(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 5.0, "tokens_per_s": 10.0, "skipped_steps": 0, "data/epoch": 0},
        {"step": 2, "loss": None, "tokens_per_s": 11.0, "skipped_steps": 1, "data/epoch": 0},  # non-finite loss
        {"step": 2, "loss": None, "eval_loss": 4.0},  # an eval row: not a skipped step
        {"step": 3, "loss": 4.5, "tokens_per_s": 12.0, "skipped_steps": 2, "data/epoch": 1},  # a non-finite grad norm
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = bench_float8_loss.read_metrics(path)
    assert metrics["losses"] == {1: 5.0, 3: 4.5}
    assert metrics["skipped_steps"] == 2 and metrics["data_epoch"] == 1
    assert metrics["speeds"] == [10.0, 12.0]


def test_the_tail_comparison_reads_the_last_common_steps() -> None:
    reference = {step: 10.0 for step in range(1, 11)}
    other = {**{step: 10.0 for step in range(1, 9)}, 9: 10.3, 10: 10.1}
    cmp = bench_float8_loss.compare(reference, other, tail=2)
    assert cmp["tail_steps"] == 2
    assert cmp["tail_rel_diff"] == pytest.approx(0.02)
    assert cmp["max_step_rel_diff"] == pytest.approx(0.03)
    # a step only one run logged is left out of both means
    assert bench_float8_loss.compare(reference, {**other, 11: 99.0}, tail=2)["tail_rel_diff"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no step in common"):
        bench_float8_loss.compare(reference, {20: 1.0}, tail=2)


def test_only_the_float8_keys_differ_between_variants(tmp_path: Path) -> None:
    args = bench_float8_loss.argparse.Namespace(
        seed=0, model="qwen3", flavor="1.7B", vocab_size=0, tokens="t.uint16.bin", shuffle_buffer=1000, steps=200,
        seq_len=4096, batch=2, device="auto", lr=3e-4, warmup=20, compile=True, ac="none")
    configs = {v: bench_float8_loss.run_config(args, v, tmp_path).splitlines() for v in bench_float8_loss.VARIANTS}
    differing = {line for v in configs for line in configs[v]} - set(configs["bf16"])
    assert differing == {"float8 = true", "float8_convert_small_gemms = true", 'float8_recipe = "tensorwise"'}

