"""posttrain on a real checkpoint: SmolLM2-135M-Instruct (converted from its GGUF) against transformers.

One transformers model and one posttrain model are loaded per module and shared by all tests (fp32, CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.models import load_hf, save_hf
from posttrain.models.greedy import greedy_generate

pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[2]
# fp32 parity: max abs diff below ABS_TOL, or below REL_TOL * max |logit| (the verify_hf_parity defaults)
ABS_TOL, REL_TOL = 1e-4, 1e-5
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Write a haiku about gradient descent, then explain it in one sentence."},
    {"role": "assistant", "content": "Small steps down the hill; the loss whispers where to go."},
    {"role": "user", "content": "Now one about overfitting."},
]
# answers with 20+ tokens before <|im_end|>, and greedy picks are clear (top-1 / top-2 logit gap > 0.2)
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the capital of France."},
]
NEW_TOKENS = 20


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What the tokenizer's own chat template renders, ready for the assistant's reply."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(smollm2_dir: Path):
    return load_hf(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_input(tokenizer) -> torch.Tensor:
    return torch.tensor([chat_ids(tokenizer, CHAT)])


@pytest.fixture(scope="module")
def hf_chat_logits(hf_model, chat_input: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=chat_input, use_cache=False).logits.float()


def test_chat_logits_match_transformers(model, hf_chat_logits: torch.Tensor, chat_input: torch.Tensor) -> None:
    with torch.no_grad():
        logits = model(chat_input).float()
    assert logits.shape == hf_chat_logits.shape == (1, chat_input.shape[1], 49152)
    max_diff = (logits - hf_chat_logits).abs().max().item()
    max_logit = hf_chat_logits.abs().max().item()
    print(f"SmolLM2 chat prompt ({chat_input.shape[1]} tokens): max abs logit diff {max_diff:.3e}, "
          f"max |logit| {max_logit:.3e}, relative {max_diff / max_logit:.3e}")
    assert max_diff < ABS_TOL or max_diff < REL_TOL * max_logit, (
        f"max abs logit diff {max_diff:.3e} (max |logit| {max_logit:.3e}) is above fp32 parity tolerance"
    )


def test_verify_hf_parity_script_passes(smollm2_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "verify_hf_parity.py"), "--hf-dir", str(smollm2_dir)],
        capture_output=True, text=True, timeout=300,
    )
    print(result.stdout)
    assert result.returncode == 0, f"verify_hf_parity failed:\n{result.stdout}\n{result.stderr}"
    assert "OK" in result.stdout


def test_greedy_generation_matches_transformers(model, hf_model, tokenizer) -> None:
    prompt = chat_ids(tokenizer, QUESTION)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        hf_out = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos,
        )
    expected = hf_out[0, len(prompt):].tolist()
    ours = greedy_generate(model, prompt, NEW_TOKENS, stop_ids=(eos,))
    print(f"greedy: {tokenizer.decode(ours)!r}")
    assert ours == expected, f"posttrain {tokenizer.decode(ours)!r} != transformers {tokenizer.decode(expected)!r}"
    assert len(ours) == NEW_TOKENS and "Paris" in tokenizer.decode(ours)


def test_save_hf_round_trips_through_transformers(
    model, smollm2_dir: Path, tmp_path: Path, hf_chat_logits: torch.Tensor, chat_input: torch.Tensor
) -> None:
    out = save_hf(model, tmp_path / "smollm2")
    original = load_file(str(smollm2_dir / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    original.pop("lm_head.weight", None)  # tied: the embedding is the head
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), f"{name} changed in the round trip"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=chat_input, use_cache=False).logits.float()
    assert torch.equal(logits, hf_chat_logits), f"max abs diff {(logits - hf_chat_logits).abs().max().item():.3e}"
