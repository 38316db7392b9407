"""The native KV-cache engine on the tier's device: greedy output equal to transformers ``generate`` on the same
device, on tiny models of every family (prompts of mixed lengths, some longer than the Gemma 3 / GPT-OSS
sliding windows) and on SmolLM2-135M-Instruct when its weights are there (tests/conftest.py's fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models import build_model, save_hf

from posttrain.inference import SamplingParams, build_engine

FAMILIES = ["llama3", "qwen3", "gemma3", "qwen3_moe", "gpt_oss"]
PROMPT_LENGTHS = (5, 29, 13, 1, 21)  # the debug flavors of gemma3 / gpt_oss slide a 16-token window


def _hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int, device: torch.device) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            generated = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
            out.append(generated[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family: str, device: torch.device, tmp_path: Path) -> None:
    torch.manual_seed(0)
    # init_std 0.1: peaked logits, so greedy picks are not decided by float noise
    model = build_model(family, "debug", device="cpu", vocab_size=1000, init_std=0.1)
    save_hf(model, tmp_path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    expected = _hf_greedy(tmp_path, prompts, 20, device)
    engine = build_engine("native", tmp_path, device=str(device), dtype="float32")
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
    assert [c.token_ids for c in completions] == expected


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_compiled_decode_equals_transformers_generate(family: str, device: torch.device, tmp_path: Path) -> None:
    """grpo.engine_compile: the blocks compiled for the decode steps, replayed in CUDA graphs on the device (a
    sliding-window family too); greedy tokens equal transformers' in fp32."""
    torch.manual_seed(0)
    model = build_model(family, "debug", device="cpu", vocab_size=1000, init_std=0.1)
    save_hf(model, tmp_path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    expected = _hf_greedy(tmp_path, prompts, 20, device)
    torch._dynamo.reset()
    engine = build_engine("native", tmp_path, device=str(device), dtype="float32", compile_decode=True)
    for _ in range(2):
        completions = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
        assert [c.token_ids for c in completions] == expected


def test_greedy_equals_transformers_generate_on_smollm2(smollm2_dir: Path, device: torch.device) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chats = [[{"role": "user", "content": "What is 7 times 8?"}],
             [{"role": "user", "content": "Tell me about the capital of France, and why it matters in history."}]]
    prompts = []
    for chat in chats:
        out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    expected = _hf_greedy(smollm2_dir, prompts, 24, device)
    engine = build_engine("native", smollm2_dir, device=str(device), dtype="float32")
    assert [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))] == expected


@pytest.mark.parametrize("kind", ["matmul", "sdpa"])
def test_decode_kernels_in_bf16_equal_fp32_attention(kind: str, device: torch.device) -> None:
    """Both decode attention kernels on the device in bf16 (the matmul one with fp32 scores), one query per row
    at spread positions against a cache view, GQA 16 / 8 heads of 128 (Qwen3-1.7B's attention)."""
    from posttrain.inference.decode_attention_choice import KERNELS, spread_positions_mask

    torch.manual_seed(0)
    cache_k = torch.randn(6, 8, 300, 128, device=device, dtype=torch.bfloat16)
    cache_v = torch.randn(6, 8, 300, 128, device=device, dtype=torch.bfloat16)
    k, v = cache_k[:, :, :256], cache_v[:, :, :256]
    q = torch.randn(6, 16, 1, 128, device=device, dtype=torch.bfloat16)
    mask = spread_positions_mask(6, 256, device)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(KERNELS[kind](q, k, v, mask, None).float(), want, rtol=2e-2, atol=1e-2)


def test_graphed_engine_with_timed_kernel_choice_is_exact(device: torch.device) -> None:
    """Graphs captured with each bucket's timed kernel choice (on CUDA): greedy tokens equal the cache-free
    reference decoder's, sampled log-probs equal the trainer's recomputation."""
    from posttrain.inference.native import NativeEngine
    from posttrain.losses import token_log_probs
    from posttrain.models.greedy import greedy_generate

    torch.manual_seed(0)
    model = build_model("qwen3", "debug", device=device, vocab_size=1000, init_std=0.1).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    engine = NativeEngine(model, max_batch_size=4, steps_per_check=3)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
    assert [c.token_ids for c in completions] == [greedy_generate(model, p, 20) for p in prompts]
    if device.type == "cuda":
        assert engine.decode_kernels and {kind for kind, _ in engine.decode_kernels.values()} <= {"matmul", "sdpa"}
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))
    with torch.no_grad():
        for c in sampled:
            ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
            hidden, weight = model(ids, output_fn=lambda h, w: (h, w))
            want = token_log_probs(hidden[:, len(c.prompt_ids) - 1: -1], weight, ids[:, len(c.prompt_ids):],
                                   vocab_size=1000, temperature=1.0)[0]
            torch.testing.assert_close(torch.tensor(c.log_probs, device=device), want.float(), atol=1e-3, rtol=0)


def test_graphed_engine_packs_a_long_running_row_to_the_front(device: torch.device, monkeypatch) -> None:
    """Seven rows end after 3 tokens and the last slot's row runs on: the engine packs it into row 0 between
    graph replays, and its attended length must still cover its positions (a stale row list once let a graph
    write the KV cache out of bounds: a device-side assert at step 7 of the real GRPO run)."""
    import posttrain.inference.native as native
    from posttrain.models.greedy import greedy_generate

    monkeypatch.setattr(native, "MIN_LENGTH_BUCKET", 8)
    monkeypatch.setattr(native, "MIN_SLOT_BUCKET", 1)
    torch.manual_seed(0)
    model = build_model("llama3", "debug", device=device, vocab_size=1000, init_std=0.1).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (45,) * 7 + (6,)]
    engine = native.NativeEngine(model, max_batch_size=8, max_seq_len=48, steps_per_check=2)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=30, temperature=0.0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert [len(c.token_ids) for c in completions] == [3] * 7 + [30]
    assert completions[-1].token_ids == greedy_generate(model, prompts[-1], 30)


def test_slots_are_capped_to_the_device_memory_the_engine_may_use(device: torch.device) -> None:
    """On CUDA the engine asks the device what it may use: a gpu_memory_utilization just above what this process
    holds, one prefill and three and a half slots need gives three slots, and the greedy tokens of eight."""
    if device.type != "cuda":
        pytest.skip("the device memory query is CUDA's (the CPU caps only with kv_cache_memory_bytes: unit tests)")
    from posttrain.inference.native import NativeEngine
    from posttrain.inference.slot_memory import device_memory, prefill_bytes, slot_bytes

    torch.manual_seed(0)
    model = build_model("qwen3", "debug", device=device, vocab_size=1000, init_std=0.1).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 29, 13, 1, 21, 8, 17, 3)]
    sampling = SamplingParams(max_new_tokens=20, temperature=0.0)
    wide = NativeEngine(model, max_batch_size=8)
    want = [c.token_ids for c in wide.generate(prompts, sampling)]
    wide.close()
    torch.cuda.empty_cache()
    args, n_layers = model.args, len(model.layers)
    per_slot = slot_bytes(args, n_layers=n_layers, cache_len=128, dtype=torch.float32)
    reserve = prefill_bytes(args, n_layers=n_layers, max_prefill_tokens=32768, cache_len=128, dtype=torch.float32)
    memory = device_memory(device)
    utilization = (memory.held + reserve + 3.5 * per_slot.total) / memory.total
    narrow = NativeEngine(model, max_batch_size=8, gpu_memory_utilization=utilization)
    got = [c.token_ids for c in narrow.generate(prompts, sampling)]
    assert narrow.cache_slots == 3
    assert got == want
