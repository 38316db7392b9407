"""The native rollout engine (posttrain.inference.native): greedy output against transformers on the real
SmolLM2 weights and against the cache-free reference decoder on every family, sampled log-probs against the
trainer's recomputation, sampling controls, stop tokens, and weight updates by HF name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.losses import token_log_probs
from posttrain.models import build_model, save_hf
from posttrain.models.greedy import greedy_generate
from posttrain.inference import GenerationEngine, SamplingParams, build_engine
from posttrain.inference.native import NativeEngine

FAMILIES = ["llama3", "qwen3", "gemma3", "qwen3_moe", "gpt_oss"]
VOCAB = 1000  # not a multiple of 64: the embedding and head are padded
PROMPT_LENGTHS = (5, 29, 13, 1, 21)  # gemma3 / gpt_oss debug flavors slide a 16-token window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small decode fastest on one thread (and do not stall when the CPU is oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    # init_std 0.1: peaked logits, so greedy picks are not decided by float noise
    return build_model(family, "debug", device="cpu", vocab_size=VOCAB, init_std=0.1, **overrides).eval()


def random_prompts(lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


# ---------------------------------------------------------------------------------------------- real weights


def test_greedy_matches_transformers_generate_on_smollm2(smollm2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    chats = [
        [{"role": "user", "content": "What is 7 times 8?"}],
        [{"role": "system", "content": "You are a concise assistant."},
         {"role": "user", "content": "Tell me about the capital of France, and why it matters in European history."}],
        [{"role": "user", "content": "Name three colours of the rainbow."}],
    ]
    prompts = []
    for chat in chats:
        out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    assert len({len(p) for p in prompts}) == 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            expected.append(out[0, len(prompt):].tolist())
    engine = build_engine("native", smollm2_dir, device="cpu", dtype="float32")
    assert isinstance(engine, GenerationEngine)
    completions = engine.generate(prompts, greedy(24, stop_token_ids=(eos,)))
    for completion, prompt, want in zip(completions, prompts, expected):
        assert completion.prompt_ids == prompt
        assert completion.token_ids == want
        assert completion.finish_reason == ("stop" if want[-1] == eos else "length")
        assert len(completion.log_probs) == len(want) and all(lp <= 0 for lp in completion.log_probs)
    engine.close()


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_cache_free_reference(family: str) -> None:
    model = tiny_model(family)
    prompts = random_prompts()
    engine = NativeEngine(model, max_batch_size=3)  # two chunks, prompts of mixed lengths in each
    completions = engine.generate(prompts, greedy(20))
    for completion, prompt in zip(completions, prompts):
        assert completion.token_ids == greedy_generate(model, prompt, 20)
        assert completion.finish_reason == "length"


def test_flex_backend_engine_matches_sdpa_engine() -> None:
    """Flex prefill (BlockMask) + dense-mask decode, with attention sinks and a sliding window (GPT-OSS)."""
    sdpa = tiny_model("gpt_oss")
    flex = tiny_model("gpt_oss", attn_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    prompts = random_prompts((29, 29))
    want = NativeEngine(sdpa).generate(prompts, greedy(8))
    got = NativeEngine(flex).generate(prompts, greedy(8))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    torch.testing.assert_close(torch.tensor([c.log_probs for c in got]), torch.tensor([c.log_probs for c in want]),
                               atol=1e-4, rtol=0)


def recomputed_log_probs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: one full forward, ``token_log_probs`` of the completion tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        hidden, weight = model(ids, output_fn=lambda h, w: (h, w))
        targets = ids[:, len(prompt):]
        return token_log_probs(hidden[:, len(prompt) - 1 : -1], weight, targets,
                               vocab_size=model.args.vocab_size, temperature=temperature)[0]


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
@pytest.mark.parametrize("filters", [{}, {"top_k": 50, "top_p": 0.9}], ids=["plain", "topk_topp"])
def test_sampled_log_probs_match_full_forward_recomputation(family: str, filters: dict) -> None:
    model = tiny_model(family)
    prompts = random_prompts()
    sampling = SamplingParams(max_new_tokens=24, temperature=0.7, seed=3, **filters)
    completions = NativeEngine(model, max_batch_size=4).generate(prompts, sampling)
    for completion, prompt in zip(completions, prompts):
        want = recomputed_log_probs(model, prompt, completion.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(completion.log_probs), want, atol=1e-4, rtol=0)


def test_greedy_log_probs_are_of_the_raw_logits() -> None:
    model = tiny_model("qwen3")
    prompts = random_prompts((7, 12))
    for completion, prompt in zip(NativeEngine(model).generate(prompts, greedy(10)), prompts):
        want = recomputed_log_probs(model, prompt, completion.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(completion.log_probs), want, atol=1e-4, rtol=0)


def test_top_k_one_is_greedy_and_a_seed_reproduces() -> None:
    model = tiny_model("llama3")
    engine = NativeEngine(model, max_batch_size=8)
    prompts = random_prompts()
    greedy_ids = [c.token_ids for c in engine.generate(prompts, greedy(16))]
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.7, top_k=1, seed=0))
    assert [c.token_ids for c in top1] == greedy_ids

    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1234)
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    other = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=4321))
    assert [(c.token_ids, c.log_probs) for c in first] == [(c.token_ids, c.log_probs) for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert [c.token_ids for c in first] != greedy_ids  # it does sample


def test_top_p_keeps_only_the_nucleus() -> None:
    """A tiny top_p keeps just the most likely token: sampling at any temperature is then greedy."""
    model = tiny_model("llama3")
    prompts = random_prompts((6, 9, 14))
    engine = NativeEngine(model)
    want = [c.token_ids for c in engine.generate(prompts, greedy(12))]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=5))
    assert [c.token_ids for c in got] == want


def test_stop_tokens_and_length_budgets_end_sequences_individually() -> None:
    model = tiny_model("gemma3")
    prompts = random_prompts((5, 29, 13, 1, 21, 8, 17))
    engine = NativeEngine(model, max_batch_size=16, max_seq_len=40)
    free = [c.token_ids for c in engine.generate(prompts, greedy(20))]
    # per-sequence budgets: prompt + completion <= max_seq_len
    assert [len(t) for t in free] == [min(20, 40 - len(p)) for p in prompts]
    stops = (free[0][2], free[3][5])
    got = engine.generate(prompts, greedy(20, stop_token_ids=stops))
    n_stopped = 0
    for completion, tokens in zip(got, free):
        hits = [i for i, t in enumerate(tokens) if t in stops]
        if hits:
            n_stopped += 1
            assert completion.token_ids == tokens[: hits[0] + 1]
            assert completion.finish_reason == "stop"
        else:
            assert completion.token_ids == tokens
            assert completion.finish_reason == "length"
        assert len(completion.log_probs) == len(completion.token_ids)
    assert 2 <= n_stopped < len(prompts)  # some stop early, some run to their budget


def test_prompt_without_room_to_generate_is_an_error() -> None:
    engine = NativeEngine(tiny_model("llama3"), max_seq_len=10)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([list(range(10))], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], greedy(4))
    assert engine.generate([list(range(10))], greedy(0))[0].token_ids == []


@pytest.mark.parametrize("family", ["llama3", "gemma3", "qwen3_moe", "gpt_oss"])
def test_update_weights_by_hf_name_makes_the_engine_that_model(family: str, tmp_path: Path) -> None:
    """Tied embeddings (gemma3), per-expert checkpoint rows (qwen3_moe), stacked experts (gpt_oss), vocab padding."""
    engine = NativeEngine(tiny_model(family, seed=0))
    target = tiny_model(family, seed=1)
    save_hf(target, tmp_path)
    named = list(load_file(str(tmp_path / "model.safetensors")).items())
    half = len(named) // 2
    engine.update_weights(named[:half])  # one call per bucket
    engine.update_weights(iter(named[half:]))
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids), target(ids), atol=0, rtol=0)
    prompts = random_prompts((4, 19))
    assert [c.token_ids for c in engine.generate(prompts, greedy(10))] == [
        greedy_generate(target, p, 10) for p in prompts
    ]
    with pytest.raises(KeyError, match="model.layers.99"):
        engine.update_weights([("model.layers.99.mlp.nonsense.weight", torch.zeros(1))])


def test_build_engine_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="grpo.engine"):
        build_engine("tgi", "/nowhere", device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- scheduling


class ForwardCounter:
    """Counts the model's forwards: prefill rows (full prompts) and decode steps (one token per slot)."""

    def __init__(self, model) -> None:
        self.prefill_rows = self.decode_steps = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        if ids.shape[1] == 1 and kwargs.get("position_ids") is not None:
            self.decode_steps += 1
        else:
            self.prefill_rows += ids.shape[0]


def test_prompt_sharing_prefills_each_prompt_once_and_samples_each_completion() -> None:
    """A GRPO group: 4 prompts x 6 completions on 8 slots, so most prompts are split across refills."""
    model = tiny_model("qwen3")
    counter = ForwardCounter(model)
    prompts = random_prompts((5, 17, 9, 12))
    group = [p for p in prompts for _ in range(6)]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    completions = NativeEngine(model, max_batch_size=8, steps_per_check=3).generate(group, sampling)
    assert counter.prefill_rows == len(prompts)
    for completion, prompt in zip(completions, group):
        assert completion.prompt_ids == prompt and len(completion.token_ids) == 12
        want = recomputed_log_probs(model, prompt, completion.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(completion.log_probs), want, atol=1e-4, rtol=0)
    for i in range(len(prompts)):
        assert len({tuple(c.token_ids) for c in completions[6 * i : 6 * i + 6]}) > 1  # the completions differ
    greedy_group = NativeEngine(model, max_batch_size=8).generate(group, greedy(12))
    assert [c.token_ids for c in greedy_group] == [greedy_generate(model, p, 12) for p in group]


def test_continuous_batching_refills_a_finished_slot_at_once() -> None:
    """One request with 24 new tokens and eight with 3 (budgets from max_seq_len) on 4 slots: the short ones
    cycle through 3 slots while the long one runs, so the call takes about as many decode steps as the long
    request alone (a static batch of 4 would wait for it: 23 + 2 + 2 steps)."""
    model = tiny_model("llama3")
    prompts = random_prompts((16,) + (37,) * 8, seed=4)
    counter = ForwardCounter(model)
    engine = NativeEngine(model, max_batch_size=4, max_seq_len=40, steps_per_check=2)
    completions = engine.generate(prompts, greedy(24))
    assert [len(c.token_ids) for c in completions] == [24] + [3] * 8
    assert counter.decode_steps <= 24
    assert [c.token_ids for c in completions] == [greedy_generate(model, p, 40 - len(p)) for p in prompts]


def test_short_attended_lengths_and_small_batch_buckets_change_nothing(monkeypatch) -> None:
    """Decode steps attend to a length bucket that covers the positions they can reach (here from 8 positions)
    and run at batch buckets from 1: greedy tokens stay the reference's, through refills, stops and packing."""
    import posttrain.inference.native as native

    monkeypatch.setattr(native, "MIN_LENGTH_BUCKET", 8)
    monkeypatch.setattr(native, "MIN_SLOT_BUCKET", 1)
    model = tiny_model("gemma3")
    prompts = random_prompts((5, 29, 13, 1, 21, 8, 17, 3, 11), seed=9)
    engine = NativeEngine(model, max_batch_size=4, steps_per_check=3)
    want = [greedy_generate(model, p, 30) for p in prompts]
    assert [c.token_ids for c in engine.generate(prompts, greedy(30))] == want
    stops = (want[0][4], want[2][7])
    for completion, tokens in zip(engine.generate(prompts, greedy(30, stop_token_ids=stops)), want):
        hits = [i for i, t in enumerate(tokens) if t in stops]
        assert completion.token_ids == (tokens[: hits[0] + 1] if hits else tokens)


def test_packing_the_live_rows_to_the_front_keeps_their_attended_length(monkeypatch) -> None:
    """Seven requests end after 3 tokens (budgets from max_seq_len) and the one in the last slot runs on: the
    engine packs it into row 0 and must keep attending to its positions (a stale row index once let the attended
    length fall below its position: an out-of-bounds cache write on the GPU)."""
    import posttrain.inference.native as native

    monkeypatch.setattr(native, "MIN_LENGTH_BUCKET", 8)
    monkeypatch.setattr(native, "MIN_SLOT_BUCKET", 1)
    model = tiny_model("llama3")
    prompts = random_prompts((45,) * 7 + (6,), seed=5)
    engine = NativeEngine(model, max_batch_size=8, max_seq_len=48, steps_per_check=2)
    completions = engine.generate(prompts, greedy(30))
    assert [len(c.token_ids) for c in completions] == [3] * 7 + [30]
    assert [c.token_ids for c in completions] == [greedy_generate(model, p, 48 - len(p) if len(p) > 18 else 30)
                                                  for p in prompts]


def test_compiled_decode_steps_generate_what_the_eager_engine_does() -> None:
    """compile_decode: the blocks compiled in place for the decode steps (one graph per slot / length bucket, shared
    by the blocks), prefill eager; greedy tokens and sampled log-probs equal the uncompiled engine's, twice."""
    model = tiny_model("llama3")
    prompts = random_prompts() * 2
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    eager = NativeEngine(model, max_batch_size=8)
    want_greedy = [c.token_ids for c in eager.generate(prompts, greedy)]
    want_sampled = eager.generate(prompts, sampled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = NativeEngine(model, max_batch_size=8, compile_decode=True)
    for _ in range(2):  # the second call replays what the first compiled
        assert [c.token_ids for c in compiled.generate(prompts, greedy)] == want_greedy
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the decode steps ran compiled blocks
    for got, want in zip(compiled.generate(prompts, sampled), want_sampled):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.log_probs), torch.tensor(want.log_probs), rtol=1e-4, atol=1e-5)
    # the blocks share their graphs: twice the layers compile no more graphs (a guard on the layer, such as a cache
    # looked up by layer name, compiled one graph per layer and bucket)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    deeper = NativeEngine(tiny_model("llama3", n_layers=4), max_batch_size=8, compile_decode=True)
    deeper.generate(prompts, greedy)
    deeper.generate(prompts, greedy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_grpo_engine_compile_is_for_the_native_engine_only() -> None:
    from posttrain.config.loader import parse_config
    from posttrain.rl.controller import check_grpo_config

    base = ["--config", "train_configs/debug_grpo.toml", "--grpo.engine_compile", "true"]
    check_grpo_config(parse_config(base))
    with pytest.raises(SystemExit, match=r"^grpo.engine_compile applies to the native engine only .*"
                                         r"set grpo.engine_compile = false$"):
        check_grpo_config(parse_config([*base, "--grpo.engine", "vllm"]))


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "qwen3_moe", "gpt_oss"])
def test_compiled_decode_steps_of_every_family_generate_what_the_eager_engine_does(family: str) -> None:
    """Whole-block graphs for each family's decode step (sliding windows, sinks, experts): the same greedy tokens."""
    model = tiny_model(family)
    prompts = random_prompts()
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    want = [c.token_ids for c in NativeEngine(model, max_batch_size=8).generate(prompts, greedy)]
    torch._dynamo.reset()
    compiled = NativeEngine(model, max_batch_size=8, compile_decode=True)
    assert [c.token_ids for c in compiled.generate(prompts, greedy)] == want
