"""Rollout throughput: posttrain's native engine against Hugging Face `generate` and the previous eager engine.

    python benchmarks/bench_rollout.py --shape smollm2-135m --prompts 256 --samples 8 --new-tokens 512 \
        --peer-prompts 32 --old-engine /path/to/old_native.py --out rollout_135m.json

A GRPO rollout: `--prompts` random prompts (lengths uniform in [--min-prompt, --max-prompt]) x `--samples`
completions each, temperature 1, no top-k / top-p, and no stop tokens, so every engine generates exactly
`--new-tokens` tokens per sequence (the `ignore_eos` budget). Random bf16 weights of the model's shape
(`smollm2-135m`: Llama, 30 layers, dim 576, 9 / 3 heads, vocab 49,152, tied; `qwen3-1.7b`: posttrain's Qwen3
1.7B flavor). Runs, one after the other in this process:

* native: `NativeEngine` (CUDA graphs, continuous batching, prompt sharing), `--max-batch-size` slots at most
  (fewer when their KV cache would not fit `--gpu-memory-utilization` of the device, as the engine's option of
  that name: the row's `slots` says how many it took; the other sequences wait for a free slot), on all prompts
  and, for the side-by-side rows, on the first `--peer-prompts` prompts; graph capture is timed apart
  (`prepare`), generation time includes prefill and everything else `generate` does.
* native_sdpa: the same engine with every decode step's attention on SDPA's masked kernel (the engine's
  `decode_attention="sdpa"`; by default, "auto", each captured bucket takes the faster of that and the
  batched-matmul kernel, timed at capture: the native rows report how many buckets took which, and the
  timings of the largest bucket), on the peer subset.
* native_compile: the same engine with `compile_decode=True` (each block compiled for the decode steps, replayed
  in the CUDA graphs; `grpo.engine_compile`), on all prompts and on the subset; its compile happens in `prepare`.
* native_eager: the same engine with `cuda_graphs=False` (peer-prompt subset).
* old_eager: the engine before this change (file given by `--old-engine`: eager decode, a batch of
  `--peer-batch` rows, finished rows dropped when half are done), on the peer subset.
* hf_static: `model.generate(..., cache_implementation="static", disable_compile=True)` of transformers'
  model of the same shape (sdpa attention), the peer subset as one batch (left-padded prompts,
  `num_return_sequences=--samples`, `min_new_tokens = max_new_tokens` in place of ignore_eos).
* hf_static_compile: the same with transformers' automatic compilation of the static-cache forward (its
  default); the first (compiling) call is a warm-up of 16 tokens and is not timed.

Also checked on the GPU (the `--check` part, small and fast): greedy tokens of graphs vs eager decoding are
identical (with either decode attention kernel), and the sampled log-probs of the default engine against the
trainer's recomputation (`token_log_probs` over a full forward) in fp32 and in bf16: the max absolute
difference is reported.

Generated tokens/s = sequences x new tokens / wall time of the `generate` call (synchronised). The markdown
table is printed last; `--out` gets JSON.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
import traceback
from typing import Any

from measure import (
    RESULTS_MARKER,
    Deadline,
    environment,
    fmt,
    free_memory,
    markdown_table,
    peak_gib,
    reset_peak,
    resolve_device,
    short_error,
    synchronize,
    write_json,
)

import torch  # noqa: E402  (measure puts the repo on sys.path first)

from posttrain.inference import SamplingParams  # noqa: E402
from posttrain.inference.native import NativeEngine  # noqa: E402
from posttrain.losses import token_log_probs  # noqa: E402
from posttrain.models import build_model  # noqa: E402
from posttrain.models.registry import get_model_spec  # noqa: E402

SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "smollm2-135m": ("llama3", "debug", dict(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536, vocab_size=49152,
        tie_embeddings=True, rope_theta=100000.0, rope_scaling=None, max_seq_len=8192, norm_eps=1e-5)),
    "qwen3-1.7b": ("qwen3", "1.7B", {}),
    "tiny": ("llama3", "debug", dict(vocab_size=512, max_seq_len=1024)),  # CPU smoke test of this script
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    family, flavor, overrides = SHAPES[shape]
    torch.manual_seed(seed)
    return build_model(family, flavor, device=device, **overrides).to(dtype).eval()


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def timed(device: torch.device, fn) -> tuple[Any, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def kernel_summary(engine: NativeEngine) -> dict[str, Any]:
    """How many captured buckets use each decode attention, the timings of the largest bucket, and every
    bucket's timings (slots x length: microseconds per call of each kernel)."""
    kernels = engine.decode_kernels
    if not kernels:
        return {}
    counts: dict[str, int] = {}
    for kind, _ in kernels.values():
        counts[kind] = counts.get(kind, 0) + 1
    largest = max(kernels, key=lambda shape: shape[0] * shape[1])
    kind, seconds = kernels[largest]
    return dict(decode_kernels=counts, largest_bucket=list(largest), largest_bucket_kernel=kind,
                largest_bucket_us={name: round(t * 1e6, 1) for name, t in seconds.items()},
                bucket_us={f"{n}x{length}": {name: round(t * 1e6, 1) for name, t in timed.items()}
                           for (n, length), (_, timed) in sorted(kernels.items())})


def run_native(model, prompts, samples, new_tokens, device, *, slots: int, graphs: bool,
               decode_attention: str = "auto", memory: dict[str, Any] | None = None,
               compile_decode: bool = False) -> dict[str, Any]:
    if compile_decode:  # the engine compiles the blocks in place: a copy, so later runs stay uncompiled
        model = copy.deepcopy(model)
        torch._dynamo.reset()
    engine = NativeEngine(model, max_batch_size=slots, cuda_graphs=graphs, max_seq_len=model.args.max_seq_len,
                          decode_attention=decode_attention, compile_decode=compile_decode, **(memory or {}))
    group = [p for p in prompts for _ in range(samples)]
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    _, t_prepare = timed(device, lambda: engine.prepare(len(group), max(map(len, prompts)) + new_tokens, sampling))
    reset_peak(device)
    completions, seconds = timed(device, lambda: engine.generate(group, sampling))
    n_tokens = sum(len(c.token_ids) for c in completions)
    assert n_tokens == len(group) * new_tokens, (n_tokens, len(group) * new_tokens)
    kernels = kernel_summary(engine)
    taken = engine.cache_slots
    engine.close()
    return dict(sequences=len(group), tokens=n_tokens, seconds=seconds, prepare_s=t_prepare, slots=taken,
                tok_per_s=n_tokens / seconds, peak_gib=peak_gib(device), **kernels)


def run_old(path: str, model, prompts, samples, new_tokens, device, *, batch: int) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("old_native_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    engine = module.NativeEngine(model, max_batch_size=batch, max_seq_len=model.args.max_seq_len)
    group = [p for p in prompts for _ in range(samples)]
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    engine.generate(group[:8], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))  # warm-up
    reset_peak(device)
    completions, seconds = timed(device, lambda: engine.generate(group, sampling))
    n_tokens = sum(len(c.token_ids) for c in completions)
    return dict(sequences=len(group), tokens=n_tokens, seconds=seconds, tok_per_s=n_tokens / seconds,
                peak_gib=peak_gib(device))


def build_hf(shape: str, device: torch.device, dtype: torch.dtype):
    import transformers

    family, flavor, overrides = SHAPES[shape]
    spec = get_model_spec(family)
    args = build_model(family, flavor, device="meta", **overrides).args
    config = dict(spec.hf_config_from_args(args))
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def run_hf(shape, prompts, samples, new_tokens, device, dtype, *, compile: bool) -> dict[str, Any]:
    model = build_hf(shape, device, dtype)
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def generate(n: int):
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=n, min_new_tokens=n, num_return_sequences=samples, pad_token_id=0,
                cache_implementation="static", disable_compile=not compile,
            )

    _, warm_s = timed(device, lambda: generate(16))
    reset_peak(device)
    out, seconds = timed(device, lambda: generate(new_tokens))
    n_tokens = (out.shape[1] - longest) * out.shape[0]
    del model
    return dict(sequences=out.shape[0], tokens=n_tokens, seconds=seconds, warmup_s=warm_s,
                tok_per_s=n_tokens / seconds, peak_gib=peak_gib(device))


def check_equality(device: torch.device, shape: str) -> dict[str, Any]:
    """Greedy: graphs == eager tokens. Sampled: log-probs vs the trainer's full-forward recomputation."""
    out: dict[str, Any] = {}
    prompts = make_prompts(32, 16, 64, SHAPES[shape][2].get("vocab_size", 2048), seed=5)
    group = [p for p in prompts for _ in range(4)]
    for dtype in (torch.float32, torch.bfloat16):
        model = build(shape, device, dtype)
        name = str(dtype).removeprefix("torch.")
        greedy = SamplingParams(max_new_tokens=48, temperature=0.0)
        for kind in ("matmul", "sdpa"):  # the same decode attention with and without graphs: the same floats
            eager = NativeEngine(model, max_batch_size=64, cuda_graphs=False, decode_attention=kind)
            graphed = NativeEngine(model, max_batch_size=64, decode_attention=kind)
            out[f"greedy_identical_{name}_{kind}"] = (
                [c.token_ids for c in eager.generate(prompts, greedy)]
                == [c.token_ids for c in graphed.generate(prompts, greedy)])
        sampled = NativeEngine(model, max_batch_size=64).generate(
            group, SamplingParams(max_new_tokens=48, temperature=1.0, seed=1))
        worst = 0.0
        with torch.no_grad():
            for c in sampled:
                ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
                hidden, weight = model(ids, output_fn=lambda h, w: (h, w))
                want = token_log_probs(hidden[:, len(c.prompt_ids) - 1: -1], weight, ids[:, len(c.prompt_ids):],
                                       vocab_size=model.args.vocab_size, temperature=1.0)[0]
                worst = max(worst, (torch.tensor(c.log_probs, device=device) - want.float()).abs().max().item())
        out[f"logprob_max_abs_diff_{name}"] = worst
        del model
        free_memory(device, reset_compiler=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=2048, help="native engine slots (at most)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="native engine: share of the device's memory this process may hold (caps the slots)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=0,
                   help="native engine: > 0: the slots' byte budget instead (on any device, the CPU too)")
    p.add_argument("--peer-prompts", type=int, default=32, help="prompts of the side-by-side subset")
    p.add_argument("--peer-batch", type=int, default=256, help="old engine batch")
    p.add_argument("--runs", default="native,native_eager,old_eager,hf_static,hf_static_compile",
                   help="comma-separated: native, native_compile, native_sdpa, native_eager, old_eager, hf_static, "
                        "hf_static_compile")
    p.add_argument("--old-engine", default="", help="path of the previous engine's native.py (old_eager)")
    p.add_argument("--check", action="store_true", help="the equality checks first")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget-s", type=float, default=300)
    p.add_argument("--out", default="")
    a = p.parse_args()
    device = resolve_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    deadline = Deadline(a.time_budget_s)
    result: dict[str, Any] = {"env": environment(device), "args": vars(a), "runs": {}}
    if a.check:
        result["check"] = check_equality(device, a.shape)
        print("check:", result["check"], flush=True)
    vocab = SHAPES[a.shape][2].get("vocab_size", 151936)
    prompts = make_prompts(a.prompts, a.min_prompt, a.max_prompt, vocab, seed=0)
    subset = prompts[: a.peer_prompts]
    model = build(a.shape, device, dtype)
    memory = dict(gpu_memory_utilization=a.gpu_memory_utilization,
                  kv_cache_memory_bytes=a.kv_cache_memory_bytes or None)
    plan = []
    for run in a.runs.split(","):
        if run == "native":
            plan.append(("native (all prompts)", lambda: run_native(model, prompts, a.samples, a.new_tokens, device,
                                                                    slots=a.max_batch_size, graphs=None,
                                                                    memory=memory)))
            plan.append(("native (subset)", lambda: run_native(model, subset, a.samples, a.new_tokens, device,
                                                               slots=a.max_batch_size, graphs=None, memory=memory)))
        elif run == "native_sdpa":
            plan.append(("native_sdpa (subset)", lambda: run_native(model, subset, a.samples, a.new_tokens, device,
                                                                    slots=a.max_batch_size, graphs=None,
                                                                    decode_attention="sdpa", memory=memory)))
        elif run == "native_compile":
            for name, chosen in (("native_compile (all prompts)", prompts), ("native_compile (subset)", subset)):
                plan.append((name, lambda chosen=chosen: run_native(model, chosen, a.samples, a.new_tokens, device,
                                                                    slots=a.max_batch_size, graphs=None,
                                                                    memory=memory, compile_decode=True)))
        elif run == "native_eager":
            plan.append(("native_eager (subset)", lambda: run_native(model, subset, a.samples, a.new_tokens, device,
                                                                     slots=a.max_batch_size, graphs=False,
                                                                     memory=memory)))
        elif run == "old_eager" and a.old_engine:
            plan.append(("old_eager (subset)", lambda: run_old(a.old_engine, model, subset, a.samples, a.new_tokens,
                                                               device, batch=a.peer_batch)))
        elif run in ("hf_static", "hf_static_compile") and device.type == "cuda":
            plan.append((f"{run} (subset)", lambda run=run: run_hf(a.shape, subset, a.samples, a.new_tokens, device,
                                                                   dtype, compile=run == "hf_static_compile")))
    for name, fn in plan:
        if deadline.expired():
            result["runs"][name] = {"error": "skipped: time budget spent"}
            continue
        try:
            result["runs"][name] = fn()
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
            traceback.print_exc()
            result["runs"][name] = {"error": short_error(err)}
        print(name, result["runs"][name], flush=True)
        free_memory(device, reset_compiler=False)
        write_json(a.out, result)
    base = result["runs"].get("native (subset)", {}).get("tok_per_s")
    rows = []
    for name, r in result["runs"].items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", r["error"]])
            continue
        ratio = fmt(base / r["tok_per_s"], ".2f") if base and "subset" in name else "-"
        note = f"native (subset) / this = {ratio}"
        if r.get("slots"):
            note += f"; {r['slots']} slots"
        if r.get("decode_kernels"):
            note += f"; decode attention per bucket {r['decode_kernels']}, largest {r['largest_bucket_us']} us"
        rows.append([name, r["sequences"], r["tokens"], fmt(r["seconds"], ".2f"), fmt(r["tok_per_s"], ",.0f"),
                     fmt(r.get("peak_gib"), ".1f"), note])
    print(RESULTS_MARKER)
    print(f"{a.shape}: {a.samples} samples x {a.new_tokens} new tokens, temperature 1, {result['env'].get('gpu')}")
    print(markdown_table(["run", "sequences", "tokens", "seconds", "gen tok/s", "peak GiB", "note"], rows))
    if "check" in result:
        print("check:", result["check"])
    write_json(a.out, result)


if __name__ == "__main__":
    main()
