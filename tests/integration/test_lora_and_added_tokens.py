"""End to end through `train.py`: a LoRA run from real SmolLM2 weights exports a PEFT adapter equal to its
merged export (base weights untouched), and a run that adds 100 semantic-ID tokens exports a checkpoint and
tokenizer that transformers reloads with the new tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

COMMON = [
    "--config", "train_configs/debug_sft.toml",
    "--metrics.log_freq", "1",
    "--metrics.tensorboard", "false",
    "--lr_scheduler.warmup_steps", "1",
    "--checkpoint.export_hf", "true",
    "--data.num_workers", "0",
]


def _train(out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "train.py", *COMMON, "--job.output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_lora_run_from_smollm2_exports_a_peft_adapter_equal_to_the_merged_model(smollm2_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    rows = _train(
        out,
        "--model.hf_path", str(smollm2_dir), "--tokenizer.path", "",
        "--training.steps", "2", "--training.seq_len", "256", "--training.batch_size", "2",
        "--optimizer.lr", "1e-3", "--lora.rank", "8", "--lora.alpha", "16",
        "--checkpoint.save_final", "false",
    )
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == str(smollm2_dir)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert adapter[f"{q}.lora_A.weight"].shape[0] == 8 and adapter[f"{q}.lora_B.weight"].abs().sum() > 0

    # base weights unchanged: merged = original + scaling * B @ A, and untargeted weights are identical
    original = load_file(str(smollm2_dir / "model.safetensors"))
    merged = load_file(str(out / "hf" / "model.safetensors"))
    delta = 2.0 * adapter[f"{q}.lora_B.weight"] @ adapter[f"{q}.lora_A.weight"]
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], original[name] + delta, rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.3.input_layernorm.weight"):
        torch.testing.assert_close(merged[name], original[name], rtol=0, atol=0)

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "hf").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
        peft_logits = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-4, atol=1e-4)


def _tiny_hf_base(tokenizer_dir: Path, out: Path) -> None:
    """A random debug Qwen3 whose vocabulary is exactly the test tokenizer's (no spare rows to reuse)."""
    from posttrain.datasets.tokenizer import HFTokenizer
    from posttrain.models import build_model, save_hf

    tokenizer = HFTokenizer(tokenizer_dir)
    torch.manual_seed(0)
    save_hf(build_model("qwen3", "debug", device="cpu", vocab_size=tokenizer.vocab_size), out, tokenizer=tokenizer)


def test_run_adding_100_semantic_id_tokens_trains_exports_and_reloads(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    _tiny_hf_base(tokenizer_dir, base)
    old_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    sids = [f"<sid_{i}>" for i in range(100)]
    (tmp_path / "sids.txt").write_text("\n".join(sids) + "\n")
    data = tmp_path / "items.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            answer = "".join(sids[(i * k) % 100] for k in (1, 7, 13))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"item {i}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")

    out = tmp_path / "run"
    rows = _train(
        out,
        "--model.hf_path", str(base), "--tokenizer.path", "",
        "--tokenizer.add_tokens_file", str(tmp_path / "sids.txt"), "--data.path", str(data),
        "--training.steps", "4", "--training.seq_len", "128", "--training.batch_size", "4",
    )
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert len(tokenizer) == old_vocab + 100
    assert tokenizer.convert_tokens_to_ids("<sid_99>") == old_vocab + 99
    assert tokenizer("<sid_5><sid_6>", add_special_tokens=False)["input_ids"] == [old_vocab + 5, old_vocab + 6]
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.vocab_size == old_vocab + 100
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == old_vocab + 100
    new_rows = emb[old_vocab:]
    assert new_rows.std(0).max() > 1e-3  # all start at the same mean row; training set them apart
    ids = torch.tensor([tokenizer("<sid_1><sid_7>", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 2, old_vocab + 100)
