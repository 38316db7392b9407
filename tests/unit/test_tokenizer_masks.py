"""HFTokenizer.tokenize_messages: ids equal the chat template's, loss mask covers assistant output only."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from posttrain.datasets.tokenizer import HFTokenizer

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}

# System prompt, reasoning in an early turn (before the last user query: Qwen3 drops it from history) and in
# later turns (after the last user query: kept), a tool call, a tool response, list-of-parts content.
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19.", "reasoning_content": "Add 12 and 7."},
    {"role": "user", "content": [{"type": "text", "text": "Use the calculator for "}, {"type": "text", "text": "123 * 45."}]},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the calculator.",
        "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "123 * 45"}}}],
    },
    {"role": "tool", "content": "5535"},
    {"role": "assistant", "content": "123 * 45 = 5535.", "reasoning_content": "The tool returned 5535."},
]
EXPECTED_RUNS = [
    "12 + 7 = 19.<|im_end|>",
    '<think>\nI should call the calculator.\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": '
    '{"expression": "123 * 45"}}\n</tool_call><|im_end|>',
    "<think>\nThe tool returned 5535.\n</think>\n\n123 * 45 = 5535.<|im_end|>",
]

MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]


def reference_ids(tokenizer: HFTokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def masked_runs(tokenizer: HFTokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
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
def tokenizer(tokenizer_dir: Path) -> HFTokenizer:
    return HFTokenizer(tokenizer_dir)


def test_vocab_fits_debug_model(tokenizer: HFTokenizer) -> None:
    assert tokenizer.vocab_size == len(tokenizer.hf) <= 2048
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>")
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>")
    for token in ("<|im_start|>", "<think>", "</think>", "<tool_call>", "<tool_response>"):
        assert tokenizer.token_id(token) is not None, token


@pytest.mark.parametrize(
    "messages, tools, add_generation_prompt",
    [
        (CONVERSATION, [CALCULATOR], False),
        (CONVERSATION, None, False),
        (MULTI_TURN, None, False),
        (MULTI_TURN[:3], None, True),
    ],
    ids=["tools", "no-tools-schema", "multi-turn", "generation-prompt"],
)
def test_ids_equal_apply_chat_template(tokenizer, messages, tools, add_generation_prompt) -> None:
    ids, mask = tokenizer.tokenize_messages(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert ids == reference_ids(tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert len(mask) == len(ids)


def test_mask_covers_assistant_output_with_reasoning_and_tool_calls(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(CONVERSATION, tools=[CALCULATOR])
    assert masked_runs(tokenizer, ids, mask) == EXPECTED_RUNS
    # The earlier turn's reasoning is not rendered at all (history rewrite), so it cannot be trained.
    assert "Add 12 and 7." not in tokenizer.decode(ids)


def test_mask_excludes_role_headers_and_other_roles(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(CONVERSATION, tools=[CALCULATOR])
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert unmasked.count("<|im_start|>assistant\n") == 3
    for text in ("You are a helpful assistant.", "What is 12 + 7?", "123 * 45.", "<tool_response>\n5535"):
        assert text in unmasked
    im_start = tokenizer.token_id("<|im_start|>")
    assert not any(m for t, m in zip(ids, mask) if t == im_start)


def test_last_turn_without_reasoning_trains_the_empty_think_block(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(MULTI_TURN)
    assert masked_runs(tokenizer, ids, mask) == [
        "The capital of France is Paris.<|im_end|>",
        "<think>\n\n</think>\n\nThe capital of Italy is Rome.<|im_end|>",
    ]


def test_generation_prompt_is_not_trained(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_messages(MULTI_TURN[:3], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert masked_runs(tokenizer, ids, mask) == ["The capital of France is Paris.<|im_end|>"]


def test_input_messages_are_not_modified(tokenizer) -> None:
    before = json.dumps(CONVERSATION, sort_keys=True)
    tokenizer.tokenize_messages(CONVERSATION, tools=[CALCULATOR])
    assert json.dumps(CONVERSATION, sort_keys=True) == before


def test_every_asset_conversation_matches_template_and_masks_each_assistant_turn(tokenizer, tokenizer_dir) -> None:
    rows = [json.loads(line) for line in (tokenizer_dir.parent / "chat.jsonl").read_text().splitlines()]
    assert len(rows) >= 200
    for row in rows:
        messages, tools = row["messages"], row.get("tools")
        ids, mask = tokenizer.tokenize_messages(messages, tools=tools)
        assert ids == reference_ids(tokenizer, messages, tools=tools)
        runs = masked_runs(tokenizer, ids, mask)
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(runs) == len(assistants)
        for run, message in zip(runs, assistants):
            assert run.endswith("<|im_end|>") and message["content"] in run


def test_unknown_role_names_the_message(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(ValueError, match=r"message 1 has unknown role 'robot'"):
        tokenizer.tokenize_messages(messages)


def test_missing_content_names_the_message(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user"}]
    with pytest.raises(ValueError, match=r"message 2 \(user\) has no 'content'"):
        tokenizer.tokenize_messages(messages)


def test_non_text_content_part_is_rejected(tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]
    with pytest.raises(ValueError, match="message 0: content part"):
        tokenizer.tokenize_messages(messages)


def _copy_without_pad(tokenizer_dir: Path, dest: Path) -> Path:
    shutil.copytree(tokenizer_dir, dest)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((dest / name).read_text())
        config.pop("pad_token", None)
        (dest / name).write_text(json.dumps(config))
    return dest


def test_missing_pad_token_uses_existing_endoftext(tokenizer_dir, tmp_path) -> None:
    path = _copy_without_pad(tokenizer_dir, tmp_path / "tok")
    tokenizer = HFTokenizer(path)
    assert tokenizer.hf.pad_token == "<|endoftext|>"
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>")
    assert tokenizer.vocab_size == HFTokenizer(tokenizer_dir).vocab_size


def test_new_pad_token_is_added_with_a_warning(tokenizer_dir, caplog) -> None:
    base = HFTokenizer(tokenizer_dir).vocab_size
    with caplog.at_level(logging.WARNING, logger="posttrain.datasets.tokenizer"):
        tokenizer = HFTokenizer(tokenizer_dir, pad_token="<|pad|>")
    assert tokenizer.vocab_size == base + 1
    assert tokenizer.pad_id == base
    assert "resized" in caplog.text and "<|pad|>" in caplog.text


def test_add_special_tokens_counts_new_tokens_and_keeps_them_whole(tokenizer_dir, caplog) -> None:
    tokenizer = HFTokenizer(tokenizer_dir)
    base = tokenizer.vocab_size
    with caplog.at_level(logging.WARNING, logger="posttrain.datasets.tokenizer"):
        assert tokenizer.add_special_tokens(["<sid_0>", "<sid_1>", "<sid_0>", "<|im_end|>"]) == 2
    assert "resized" in caplog.text
    assert tokenizer.vocab_size == base + 2
    assert tokenizer.add_special_tokens(["<sid_1>"]) == 0
    assert tokenizer.encode("<sid_1><sid_0>") == [base + 1, base]
    assert HFTokenizer(tokenizer_dir, add_special_tokens=["<sid_0>"]).vocab_size == base + 1


def test_save_round_trips_added_tokens(tokenizer_dir, tmp_path) -> None:
    tokenizer = HFTokenizer(tokenizer_dir, add_special_tokens=["<sid_7>"])
    tokenizer.save(tmp_path / "saved")
    reloaded = HFTokenizer(tmp_path / "saved")
    assert reloaded.vocab_size == tokenizer.vocab_size
    assert reloaded.tokenize_messages(CONVERSATION) == tokenizer.tokenize_messages(CONVERSATION)
    assert reloaded.encode("<sid_7> 12 + 7") == tokenizer.encode("<sid_7> 12 + 7")


def test_encode_decode_round_trip(tokenizer) -> None:
    text = "It is 21°C and sunny in Paris. 123 * 45 = 5535."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_eos=True) == ids + [tokenizer.eos_id]


def test_tokenize_text_appends_eos(tokenizer) -> None:
    ids = tokenizer.tokenize_text("The capital of France is Paris.")
    assert ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[:-1]) == "The capital of France is Paris."


def test_prompt_completion_trains_completion_and_eos(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_prompt_completion("Q: What is 12 + 7?\nA:", " 12 + 7 = 19.")
    assert tokenizer.decode(ids) == "Q: What is 12 + 7?\nA: 12 + 7 = 19.<|im_end|>"
    assert masked_runs(tokenizer, ids, mask) == [" 12 + 7 = 19.<|im_end|>"]


def test_conversational_prompt_completion_trains_completion_turns_only(tokenizer) -> None:
    ids, mask = tokenizer.tokenize_prompt_completion(MULTI_TURN[:3], MULTI_TURN[3:])
    assert ids == reference_ids(tokenizer, MULTI_TURN)
    assert masked_runs(tokenizer, ids, mask) == ["<think>\n\n</think>\n\nThe capital of Italy is Rome.<|im_end|>"]


GENERATION_TAG_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_mask_agrees_with_generation_tags(tokenizer_dir, tmp_path) -> None:
    """Where a template marks generated text with {% generation %}, our search finds the same tokens."""
    path = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = GENERATION_TAG_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = HFTokenizer(path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4.", "reasoning_content": "Two plus two."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6."},
    ]
    ids, mask = tokenizer.tokenize_messages(messages)
    out = tokenizer.hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    assert mask == [bool(m) for m in out["assistant_masks"]]


def test_enable_thinking_false_keeps_the_prefilled_empty_think_block_untrained(tokenizer) -> None:
    """With enable_thinking=False the generation prompt itself ends in an empty <think> block (Qwen3)."""
    ids, mask = tokenizer.tokenize_messages(MULTI_TURN, chat_template_kwargs={"enable_thinking": False})
    assert masked_runs(tokenizer, ids, mask) == [
        "The capital of France is Paris.<|im_end|>",
        "The capital of Italy is Rome.<|im_end|>",
    ]


LLAMA3_STYLE_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA_STYLE_TEMPLATE = (
    "{{ '<bos>' }}{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    "template, end_of_turn",
    [(LLAMA3_STYLE_TEMPLATE, "<|eot_id|>"), (GEMMA_STYLE_TEMPLATE, "<end_of_turn>")],
    ids=["llama3-style", "gemma-style"],
)
def test_other_template_families(tokenizer_dir, template, end_of_turn) -> None:
    """Headers and end-of-turn tokens are learned from the template, not hard-coded to ChatML."""
    tokenizer = HFTokenizer(
        tokenizer_dir,
        add_special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                            "<bos>", "<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.hf.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}] + MULTI_TURN
    ids, mask = tokenizer.tokenize_messages(messages)
    assert ids == reference_ids(tokenizer, messages)
    assert masked_runs(tokenizer, ids, mask) == [
        f"The capital of France is Paris.{end_of_turn}",
        f"The capital of Italy is Rome.{end_of_turn}",
    ]
