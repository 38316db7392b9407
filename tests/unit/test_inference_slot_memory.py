"""The native engine's slots sized to its memory (posttrain.inference.slot_memory): bytes per slot against what the
cache and the decode state really allocate, the budget from device memory passed in as plain numbers, the cap
on the Qwen3-1.7B shape that once crashed an H200 with 2048 slots, and equal greedy tokens however few slots fit."""

from __future__ import annotations

import logging

import pytest
import torch

from posttrain.inference import SamplingParams
from posttrain.inference.decode_step import SlotState
from posttrain.inference.native import NativeEngine
from posttrain.inference.slot_cache import SlotKVCache
from posttrain.inference.slot_memory import (
    DeviceMemory,
    engine_memory_budget,
    plan_slots,
    prefill_bytes,
    slot_bytes,
)
from posttrain.models import build_model

GIB = 2**30
VOCAB = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _allocated_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family,dtype", [("llama3", torch.float32), ("qwen3", torch.bfloat16),
                                          ("gemma3", torch.float32), ("gpt_oss", torch.bfloat16)])
def test_slot_bytes_are_what_the_cache_and_decode_state_allocate(family: str, dtype: torch.dtype) -> None:
    """gemma3 / gpt_oss have sliding-window layers: their caches are full length too, and the count says so."""
    model = build_model(family, "debug", device="cpu", vocab_size=VOCAB).to(dtype)
    slots, cache_len, n_stop = 3, 40, 8
    cache = SlotKVCache.for_model(model, batch=slots, max_len=cache_len)
    state = SlotState.empty(slots, cache_len, n_stop, torch.device("cpu"))
    per_slot = slot_bytes(model.args, n_layers=len(model.layers), cache_len=cache_len, dtype=dtype)
    assert slots * per_slot.kv_cache == _allocated_bytes([*cache.k.values(), *cache.v.values()])
    state_tensors = [getattr(state, name) for name in state.__dataclass_fields__ if name != "stop_ids"]
    assert slots * per_slot.decode_state == _allocated_bytes(state_tensors)
    # the decode step's temporaries per slot: at least its fp32 logits and log-probs over the vocabulary
    assert per_slot.workspace >= 2 * 4 * VOCAB
    assert per_slot.total == per_slot.kv_cache + per_slot.decode_state + per_slot.workspace


def _qwen3_1_7b():
    return build_model("qwen3", "1.7B", device="meta")


def test_the_qwen3_1_7b_slot_that_crashed_an_h200_at_2048_slots() -> None:
    model = _qwen3_1_7b()
    args = model.args
    per_slot = slot_bytes(args, n_layers=len(model.layers), cache_len=640, dtype=torch.bfloat16)
    # 640 positions x 28 layers x (K and V) x 8 KV heads x head dim 128 x 2 bytes
    assert (args.n_layers, args.n_kv_heads, args.head_dim) == (28, 8, 128)
    assert per_slot.kv_cache == 640 * 28 * 2 * 8 * 128 * 2
    assert 2048 * per_slot.kv_cache > 139 * GIB  # the OOM of the bench at 2048 slots


def test_engine_budget_is_its_share_of_the_total_less_what_it_holds_never_more_than_free() -> None:
    assert engine_memory_budget(DeviceMemory(free=100 * GIB, total=200 * GIB, held=30 * GIB), 0.5) == 70 * GIB
    # another process (a colocated trainer) holds most of the device: only the free memory is taken
    assert engine_memory_budget(DeviceMemory(free=20 * GIB, total=200 * GIB, held=30 * GIB), 0.5) == 20 * GIB
    assert engine_memory_budget(DeviceMemory(free=100 * GIB, total=200 * GIB, held=120 * GIB), 0.5) == 0


def test_plan_caps_2048_slots_to_what_fits_an_h200_and_refuses_when_not_one_fits() -> None:
    model = _qwen3_1_7b()
    n_layers, dtype = len(model.layers), torch.bfloat16
    per_slot = slot_bytes(model.args, n_layers=n_layers, cache_len=640, dtype=dtype)
    reserve = prefill_bytes(model.args, n_layers=n_layers, max_prefill_tokens=32768, cache_len=640, dtype=dtype)
    h200 = DeviceMemory(free=135 * GIB, total=139 * GIB, held=4 * GIB)  # the model's weights held
    plan = plan_slots(2048, per_slot, memory=h200, utilization=0.9, kv_cache_memory_bytes=None,
                      prefill_reserve=reserve)
    budget = engine_memory_budget(h200, 0.9) - reserve
    assert plan.capped and plan.budget == budget
    assert plan.slots * per_slot.total <= budget < (plan.slots + 1) * per_slot.total
    assert 1024 < plan.slots < 2048  # still a big batch
    # a lower share takes proportionally fewer slots; an explicit byte budget wins over the device's numbers
    assert plan_slots(2048, per_slot, memory=h200, utilization=0.5, kv_cache_memory_bytes=None,
                      prefill_reserve=reserve).slots < plan.slots
    assert plan_slots(2048, per_slot, memory=h200, utilization=0.9, kv_cache_memory_bytes=5 * per_slot.total,
                      prefill_reserve=reserve).slots == 5
    # on the CPU (no device memory) nothing is capped
    assert plan_slots(2048, per_slot, memory=None, utilization=0.9, kv_cache_memory_bytes=None,
                      prefill_reserve=reserve).slots == 2048
    # a 40k-token sequence (4.4 GiB of KV cache, and a prefill of 40k tokens) on a 16 GiB card: not one slot
    long_slot = slot_bytes(model.args, n_layers=n_layers, cache_len=40960, dtype=dtype)
    long_reserve = prefill_bytes(model.args, n_layers=n_layers, max_prefill_tokens=32768, cache_len=40960,
                                 dtype=dtype)
    small = DeviceMemory(free=12 * GIB, total=16 * GIB, held=4 * GIB)
    with pytest.raises(torch.OutOfMemoryError) as err:
        plan_slots(64, long_slot, memory=small, utilization=0.9, kv_cache_memory_bytes=None,
                   prefill_reserve=long_reserve)
    message = str(err.value)
    assert "\n" not in message and "40960 positions" in message and "gpu_memory_utilization 0.9" in message


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # init_std 0.1: peaked logits, so greedy picks are not decided by float noise
    return build_model("llama3", "debug", device="cpu", vocab_size=VOCAB, init_std=0.1).eval()


def test_a_capped_engine_decodes_the_same_greedy_tokens_with_three_slots_as_with_sixteen(caplog) -> None:
    """Groups of one prompt (prefilled once, copied to slots over several refills: with three slots, the fourth
    completion of a group waits for a free slot with its prompt's kept keys / values) and prompts of mixed
    lengths; the cap is logged once, not per call."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(3)
    distinct = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 19, 3, 26, 12)]
    prompts = [p for p in distinct for _ in range(4)]  # 20 requests: 16 slots asked for (max_batch_size)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    wide = NativeEngine(model, max_batch_size=16, steps_per_check=3)
    want = wide.generate(prompts, sampling)
    assert wide.cache_slots == 16
    cache_len = 128  # prompt + completion rounded up to the engine's cache length multiple
    per_slot = slot_bytes(model.args, n_layers=len(model.layers), cache_len=cache_len, dtype=torch.float32)
    narrow = NativeEngine(model, max_batch_size=16, steps_per_check=3, kv_cache_memory_bytes=3 * per_slot.total + 7)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        got = narrow.generate(prompts, sampling)
        again = narrow.generate(prompts, sampling)
    assert narrow.cache_slots == 3
    assert [c.token_ids for c in got] == [c.token_ids for c in want] == [c.token_ids for c in again]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=1e-5, rtol=0)
    lines = [r.getMessage() for r in caplog.records if "slots requested" in r.getMessage()]
    assert len(lines) == 1 and "16 slots requested, 3 fit" in lines[0] and "kv_cache_memory_bytes" in lines[0]


def test_an_engine_without_room_for_one_slot_says_so_in_one_line() -> None:
    engine = NativeEngine(_tiny_llama(), kv_cache_memory_bytes=4096)
    with pytest.raises(torch.OutOfMemoryError, match="cannot hold even one sequence: a slot of 128 positions"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        NativeEngine(_tiny_llama(), gpu_memory_utilization=1.5)


def test_grpo_config_refuses_a_memory_share_outside_zero_to_one() -> None:
    from posttrain.config.loader import parse_config
    from posttrain.rl.controller import check_grpo_config

    base = ["--config", "train_configs/debug_grpo.toml"]
    check_grpo_config(parse_config([*base, "--grpo.gpu_memory_utilization", "1.0"]))
    for bad in ("0", "1.2"):
        with pytest.raises(SystemExit, match=r"grpo.gpu_memory_utilization must be in \(0, 1\]"):
            check_grpo_config(parse_config([*base, "--grpo.gpu_memory_utilization", bad]))
