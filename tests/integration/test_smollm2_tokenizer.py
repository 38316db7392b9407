"""HFTokenizer on a real model's tokenizer: SmolLM2-135M-Instruct converted from its GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.datasets.tokenizer import HFTokenizer

pytestmark = pytest.mark.integration

# SmolLM2's template renders role + content verbatim: no reasoning, no tool-call rendering, and a default
# system prompt when the first message is not a system message.
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19.", "reasoning_content": "Add 12 and 7."},
    {"role": "user", "content": [{"type": "text", "text": "Use the calculator for 123 * 45."}]},
    {"role": "assistant", "content": "Calling the calculator."},
    {"role": "tool", "content": "5535"},
    {"role": "assistant", "content": "123 * 45 = 5535.", "reasoning_content": "The tool returned 5535."},
]
NO_SYSTEM = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]


def as_text_content(messages: list[dict]) -> list[dict]:
    """SmolLM2's template concatenates content, so the reference render needs plain-string content."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        out.append({**message, "content": content})
    return out


def reference_ids(tokenizer: HFTokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.hf.apply_chat_template(as_text_content(messages), tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def masked_runs(tokenizer: HFTokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> HFTokenizer:
    return HFTokenizer(smollm2_dir)


def test_converted_folder_is_plain_float32(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config.get("dtype") or config.get("torch_dtype")) == "float32"


def test_pad_and_eos(tokenizer: HFTokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>")
    assert tokenizer.pad_id is not None


@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system-tool", "default-system"])
def test_ids_equal_apply_chat_template(tokenizer: HFTokenizer, messages) -> None:
    ids, mask = tokenizer.tokenize_messages(messages)
    assert ids == reference_ids(tokenizer, messages)
    assert len(mask) == len(ids)
    ids, _ = tokenizer.tokenize_messages(messages[:-1], add_generation_prompt=True)
    assert ids == reference_ids(tokenizer, messages[:-1], add_generation_prompt=True)


def test_masked_spans_are_assistant_content_and_end_of_turn(tokenizer: HFTokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(CONVERSATION)
    assert masked_runs(tokenizer, ids, mask) == [
        "12 + 7 = 19.<|im_end|>",
        "Calling the calculator.<|im_end|>",
        "123 * 45 = 5535.<|im_end|>",
    ]
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert unmasked.count("<|im_start|>assistant\n") == 3
    assert "<|im_start|>tool\n5535<|im_end|>" in unmasked


def test_default_system_prompt_is_not_trained(tokenizer: HFTokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(NO_SYSTEM)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)
    assert masked_runs(tokenizer, ids, mask) == [
        "The capital of France is Paris.<|im_end|>",
        "The capital of Italy is Rome.<|im_end|>",
    ]


def test_unknown_role_names_the_message(tokenizer: HFTokenizer) -> None:
    with pytest.raises(ValueError, match=r"message 2 has unknown role 'narrator'"):
        tokenizer.tokenize_messages(NO_SYSTEM[:2] + [{"role": "narrator", "content": "..."}])
