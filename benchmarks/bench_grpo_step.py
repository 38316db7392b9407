"""GRPO's trainer side, timed on one device: the old log-prob pass, the policy update and the weight sync.

    python benchmarks/bench_grpo_step.py --shape smollm2-135m --out grpo_step.json
    TORCH_LOGS=recompiles python benchmarks/bench_grpo_step.py ...   # every recompilation, with its reason

The GRPO step of `train_configs/smollm2_135m_grpo.toml` without Ray and without the engine: one
`PolicyWorker` (the class the Ray actor runs) is set up in this process from that config, on a random-weight
model of the shape (`bench_rollout.SHAPES`, saved as an HF folder with the test tokenizer), and fed synthetic
completions (`--completions` rows, prompt and response lengths uniform in the given ranges, random tokens and
advantages). Each pass is called `--calls` times so the first call (compilation, autotuning, allocator growth)
shows apart from the steady state:

* logprobs: `PolicyWorker.log_probs(rows, old=True)`: the old log-prob pass over packed rows of
  `grpo.micro_batch_tokens` positions (no gradient);
* update: `grpo.minibatches` calls of `PolicyWorker.train_minibatch` (forward with entropy, backward, clip,
  AdamW), the rows carrying the old log-probs just computed; the first minibatch of each call runs the policy
  that scored them, so its mean ratio must be 1 and no token may be clipped (the log-prob pass and the update's
  forward must compute the same numbers: same precision, same kernels);
* weight sync: the policy's HF-named weights gathered into buckets (`hf_weight_buckets`) on the device, and,
  on CUDA, exported as IPC handles (`share_bucket`), what the colocated engine receives.

Times are wall clock around synchronised calls. The markdown table is printed last; `--out` gets JSON.
`--profile DIR`: after the timed calls, one more log-prob pass and one more update (all minibatches) under
torch.profiler; their kernel-category summaries (GPU busy, host gaps, top kernels) are printed and written to DIR.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_rollout import SHAPES, build
from profile_summary import profile_steps, render_summary, summarize, write_profile
from measure import RESULTS_MARKER, environment, markdown_table, peak_gib, reset_peak, resolve_device, synchronize, write_json

import torch  # noqa: E402  (measure puts the repo on sys.path first)

from posttrain.config.loader import load_config  # noqa: E402
from posttrain.models.hf import save_hf  # noqa: E402
from posttrain.rl.weight_sync import hf_weight_buckets, share_bucket  # noqa: E402
from posttrain.rl.workers import PolicyWorker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "assets" / "tokenizer"


def write_model(shape: str, out: Path) -> int:
    """A random-weight HF folder of `shape` with the test tokenizer; returns the tokenizer's vocabulary size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    model = build(shape, torch.device("cpu"), torch.float32)
    if model.args.vocab_size < len(tokenizer):
        raise SystemExit(f"--shape {shape}: vocabulary {model.args.vocab_size} < the test tokenizer's {len(tokenizer)}")
    save_hf(model, out, tokenizer=tokenizer)
    return len(tokenizer)


def synthetic_rows(n: int, prompt_len: tuple[int, int], response_len: tuple[int, int], vocab: int,
                   seed: int, group_size: int = 1) -> list[dict[str, Any]]:
    """`n` completions, `group_size` of each prompt (a GRPO group), the groups interleaved as in a shuffled
    minibatch."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))]
               for _ in range(-(-n // group_size))]
    rows = []
    for i in range(n):
        r = rng.randint(*response_len)
        rows.append({"prompt_ids": list(prompts[i % len(prompts)]),
                     "token_ids": [rng.randrange(3, vocab) for _ in range(r)],
                     "engine_logp": [-1.0] * r, "advantage": rng.gauss(0.0, 1.0)})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(device: torch.device, fn, what: str = "") -> tuple[Any, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    if what:
        print(f"[{time.strftime('%H:%M:%S')}] {what}: {seconds:.3f} s", file=sys.stderr, flush=True)
    return out, seconds


def profile_passes(worker: PolicyWorker, rows: list[dict[str, Any]], minibatches: int, device: torch.device,
                   out_dir: Path, shape: str) -> dict[str, Any]:
    """One more old log-prob pass and one more update (every minibatch) under torch.profiler, after the timed
    calls so neither their times nor the peak memory see it."""
    size = -(-len(rows) // minibatches)
    passes = {
        "logprobs": lambda: worker.log_probs(rows, old=True, ref=False, entropy=False),
        "update": lambda: [worker.train_minibatch(rows[m * size:(m + 1) * size]) for m in range(minibatches)],
    }
    out = {}
    for name, run in passes.items():
        prof, wall_s = profile_steps(run, 1, device)
        summary = summarize(prof, wall_s, 1)
        title = f"GRPO {name} pass, {shape}, {len(rows)} completions"
        files = write_profile(prof, summary, title, out_dir, f"grpo_step_{shape}_{name}")
        print(render_summary(title, {**summary, "top": summary["top"][:12]}), flush=True)
        out[name] = {**{k: v for k, v in summary.items() if k != "top"}, "files": [str(f) for f in files]}
        del prof
    return out


def set_inductor_config(setting: str) -> None:
    """`KEY=VALUE` onto torch._inductor.config (VALUE read as a Python literal, else kept as a string)."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, text = setting.partition("=")
    if not sep or not hasattr(inductor_config, key):
        raise SystemExit(f"--inductor {setting!r}: expected KEY=VALUE with KEY a torch._inductor.config setting")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    setattr(inductor_config, key, value)
    print(f"torch._inductor.config.{key} = {value!r}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--config", default=str(REPO / "train_configs" / "smollm2_135m_grpo.toml"))
    p.add_argument("--completions", type=int, default=512, help="rows per GRPO step (prompts x group size)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(30, 60))
    p.add_argument("--response-len", type=int, nargs=2, default=(16, 128))
    p.add_argument("--group-size", type=int, default=1,
                   help="completions per prompt (1: every completion its own prompt, as the earlier rows)")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile one more log-prob pass and update after the timed calls; summaries to DIR")
    p.add_argument("--stack-every", type=float, default=0,
                   help="print every thread's Python stack to stderr every this many seconds (0: never): where a stall is")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for the compiled blocks, e.g. combo_kernels=True (repeatable)")
    p.add_argument("overrides", nargs="*", help="train.py overrides, e.g. --grpo.micro_batch_tokens 8192 (after --)")
    a = p.parse_args()
    device = resolve_device(a.device)
    for setting in a.inductor:
        set_inductor_config(setting)
    if a.stack_every > 0:
        faulthandler.dump_traceback_later(a.stack_every, repeat=True, file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = write_model(a.shape, tmp / "hf")
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"question": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(8)))
        cfg = load_config(["--config", a.config, "--model.hf_path", str(tmp / "hf"), "--grpo.prompts", str(prompts),
                           "--grpo.eval_prompts", str(prompts), "--job.output_dir", str(tmp / "run"),
                           "--training.device", device.type, *a.overrides])
        worker = PolicyWorker()
        _, setup_s = timed(device, lambda: worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1",
                                                        master_port=free_port()), "setup")
        rows = synthetic_rows(a.completions, tuple(a.prompt_len), tuple(a.response_len), vocab, a.seed,
                              a.group_size)
        tokens = sum(len(r["prompt_ids"]) + len(r["token_ids"]) - 1 for r in rows)
        minibatches = cfg.grpo.minibatches
        results: list[dict[str, Any]] = []
        reset_peak(device)
        for call in range(a.calls):
            scored, s = timed(device, lambda: worker.log_probs(rows, old=True, ref=False, entropy=False),
                               f"logprobs call {call + 1}")
            results.append({"pass": "logprobs", "call": call + 1, "s": s, "tokens": tokens})
            for row, old in zip(rows, scored["old_logp"]):
                row["old_logp"] = old
            size = -(-len(rows) // minibatches)
            first_stats: dict[str, float] = {}
            t_update = 0.0
            for m in range(minibatches):
                stats, s = timed(device, lambda: worker.train_minibatch(rows[m * size:(m + 1) * size]),
                                 f"update call {call + 1} minibatch {m + 1}")
                t_update += s
                if m == 0:
                    first_stats = stats
            results.append({"pass": "update", "call": call + 1, "s": t_update, "tokens": tokens,
                            "first_minibatch": {k: first_stats.get(k) for k in ("ratio", "clip_low", "clip_high",
                                                                                 "tokens", "loss")}})
        model = worker.trainer.model
        bucket_bytes = cfg.grpo.weight_sync_bucket_mb * 2**20
        for call in range(a.calls):
            def gather() -> int:
                n = 0
                for bucket in hf_weight_buckets(model, bucket_bytes=bucket_bytes, device=device):
                    if device.type == "cuda":
                        share_bucket(bucket)
                    n += len(bucket)
                return n
            n, s = timed(device, gather, f"weight sync call {call + 1}")
            results.append({"pass": "weight sync (gather" + (" + IPC handles)" if device.type == "cuda" else ")"),
                            "call": call + 1, "s": s, "tokens": n})
        peak = peak_gib(device)
        profiles = profile_passes(worker, rows, minibatches, device, Path(a.profile), a.shape) if a.profile else {}
        worker.close()

    report = {"env": environment(device), "shape": a.shape, "config": a.config, "overrides": a.overrides,
              "completions": a.completions, "tokens_per_pass": tokens, "setup_s": setup_s, "peak_gib": peak,
              "micro_batch_tokens": cfg.grpo.micro_batch_tokens, "minibatches": minibatches, "results": results,
              "profiles": profiles}
    if a.out:
        write_json(a.out, report)
    table = []
    for r in results:
        fm = r.get("first_minibatch") or {}
        n_tok = fm.get("tokens") or 0
        ratio = f"{fm['ratio'] / n_tok:.6f}" if n_tok and fm.get("ratio") is not None else "-"
        n_clipped = (fm.get("clip_low") or 0) + (fm.get("clip_high") or 0)
        clipped = f"{n_clipped:.0f}" if fm else "-"
        if fm and (n_clipped > 0 or ratio == "-" or abs(float(ratio) - 1.0) > 1e-3):
            ratio += " MISMATCH (the scoring pass and the update's forward differ)"
        rate = f"{r['tokens'] / r['s']:,.0f}" if "sync" not in r["pass"] else "-"
        table.append([r["pass"], r["call"], f"{r['s']:.3f}", f"{r['tokens']:,}", rate, ratio, clipped])
    print(RESULTS_MARKER)
    print(f"### GRPO trainer passes: {a.shape}, {a.completions} completions ({tokens:,} positions), "
          f"group size {a.group_size}, micro_batch_tokens {cfg.grpo.micro_batch_tokens}, share_prompts "
          f"{cfg.grpo.share_prompts}, {minibatches} minibatches, setup {setup_s:.1f} s, "
          f"peak {peak if peak is not None else '-'} GiB, {device}")
    print(markdown_table(["pass", "call", "s", "tokens / tensors", "tokens/s", "ratio (1st minibatch)",
                          "clipped tokens"], table))


if __name__ == "__main__":
    main()
