"""SFT step throughput: posttrain against Hugging Face transformers peers, same shape, data, precision, GPU.

    python benchmarks/bench_sft.py --model qwen3 --flavor 1.7B --seq-len 4096 --batch 2 \
        --posttrain-variants compile+flex,eager+sdpa --peers hf_eager,hf_compile,hf_liger --out sft.json

Everything runs in ONE process, one run after the other, memory freed in between (gc, dynamo reset,
empty_cache). Order: the first posttrain variant, then the peers, then the other posttrain variants, so
that under a tight budget the headline comparison is what gets done. Every run trains a randomly initialised model
whose parameters AND AdamW states are bf16 (`--dtype`), with fused AdamW and gradient clipping at 1.0, on the same
synthetic rows of random token ids, from the SAME initial weights: posttrain's (`--seed`), taken to the CPU once
before the first peer is built (from the first posttrain variant before its first step, or from a posttrain model
built for it when a peer runs first), converted by the project's HF export and loaded strictly into every peer
(`same_init.py`; `--no-same-init`: transformers' own init). So every run computes the same losses up to rounding:
the `loss vs peer` column and the last target line check that (first-step loss within 0.1%, the loss after the
same number of steps within 2%; the tolerances are justified in same_init.py; no verdict for float8 variants,
for LoRA the first loss only) -- a difference there is a difference in computation, not in initialisation.
posttrain's MoE loss also adds the router's load-balancing term (router_aux_loss_coef x aux); the HF MoE peers
run with output_router_logits on, so transformers adds it too (averaged over the layers a little differently).

* posttrain: the real path -- `Trainer` (build_training_model: parallelize -> AC -> compile, meta-device
  build, init; build_optimizer; build_lr_scheduler) and `Trainer.train_step` with the SFT recipe's
  `sft_loss` (chunked cross-entropy inside the model forward). A variant is "+"-joined tokens:
  `compile|eager`, `flex|sdpa`, `kernel=auto|cudnn|flash|efficient|math|fa4` (`model.sdpa_kernel`; fa4: FlashAttention-4, needs flash-attn-4), `ac=none|full|selective|op|budget`, `every=N` (selective AC), `skip=N`
  (`activation_checkpoint.skip_last`: the last N blocks not checkpointed), `offload=N`
  (`activation_checkpoint.offload_blocks`: the first N unwrapped blocks keep their saved activations in pinned host
  memory; compare its peak with `peak_reserved_gib` too, since memory a copy still reads counts as free), `budget=X`
  (`activation_checkpoint.memory_budget` of budget AC, default 0.5), `chunk=N` (loss chunk,
  0 = auto), `loss=fused|chunked` (`training.loss_impl`, default fused), `float8` (`training.float8`: torchao
  rowwise float8 in the blocks' Linear layers; needs compile and torchao), `float8=all` (also
  `training.float8_convert_small_gemms`), `float8=tensorwise` (`training.float8_recipe = "tensorwise"`) or
  `float8=tensorwise-all` (both),
  `recompute=on|off` (`compile.recompute_pointwise`, default on: compiled blocks rebuild norm outputs and the
  SwiGLU product in backward instead of saving them), `lora=R` (LoRA of rank R, alpha 2R, on every attention / MLP
  projection; the issue-formula MFU still counts 6N, the causal MFU is the trainer's, which counts what LoRA
  computes), `cudagraphs` (`compile.cudagraphs`: the compiled blocks replayed as
  CUDA graphs; one device, no activation checkpointing), `adamw=triton|torch|foreach` (`optimizer.fused`: the
  project's Triton AdamW, torch's fused one, foreach; default auto = Triton on one CUDA device), `embgrad=sparse|dense`
  (`training.sparse_embedding_grad`, default dense: sparse = a tied embedding's lookup gradient as rows), `norm=triton|autograd`
  (`model.rms_norm_backward`: RMSNorm's backward as one pass over the rows, or autograd's), `inductor=NAME` / `inductor=-NAME`
  (a boolean of `torch._inductor.config` switched on / off for this run, e.g. `inductor=coordinate_descent_tuning`,
  `inductor=-size_asserts`) or `inductor=NAME=VALUE` (any bool / int / float / str setting, dotted names for the
  nested sections, e.g. `inductor=triton.persistent_reductions=0`); repeatable, `cel2=K` (the fused loss's
  CE-gradient kernel as K programs per SM that re-read rows from L2: `ce_grad_kernel.L2_PROGRAMS_PER_SM`, default 0 =
  one program per row), `blas=cublas|cublaslt` (`torch.backends.cuda.preferred_blas_library` for this run; on the
  Llama-3.2-1B step cuBLASLt was no faster, BENCHMARKS.md session 20). MFU stays
  relative to the bf16 peak. The HF peers run with torch's own partitioner settings (posttrain's are process-wide).
* hf_eager / hf_compile / hf_liger / hf_liger_compile: `AutoModelForCausalLM.from_config` of posttrain's
  own `hf_config_from_args` (attn_implementation="sdpa"), loss from `model(input_ids, labels=...)`;
  `torch.compile(model)` for the compiled peers; Liger's `apply_liger_kernel_to_<family>` (RoPE, RMSNorm,
  SwiGLU, fused linear cross-entropy) for the Liger peers -- skipped when `import liger_kernel` fails. Liger
  patches transformers' classes for the rest of the process, so Liger peers always run last.

Measured per run, over the timed steps after warmup (cuda synchronize + perf_counter around the window):
tokens/s (all B x S positions), MFU with ONE formula for every run -- (6 N + 6 L H Dh S) FLOPs per token x
tokens/s / peak, N = all parameters including embeddings (the issue's definition) -- posttrain's own
causal-aware MFU (from the FLOPs `train_step` reports; the same helpers for the peers), peak allocated
memory (reset after warmup: the steady state of weights, grads, optimizer states and activations), and ratios
posttrain / peer. Per timed step also (`measure.StepMarks`): host and device (CUDA events) milliseconds and
Python's garbage collections inside the window; over the window, nvidia-smi's SM clock and power samples
(`measure.GpuClockSampler`); on the H200 the device times spread by ~10% within one run (the
GPU runs at its 700 W power cap, clocks 1.4-1.9 GHz), so compare runs of one call over many steps. Each run is
wrapped in try/except: an OOM or compile error prints `failed: <reason>` and the rest still run. A global
`--time-budget-s` cuts warmup/timed loops short and skips runs that no longer fit. The markdown tables are printed last, after a `=== RESULTS ===` line; `--out` gets JSON, rewritten
after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from profile_summary import profile_steps, record_memory_step, render_summary, summarize, write_profile
from measure import (
    RESULTS_MARKER,
    Deadline,
    GpuClockSampler,
    StepMarks,
    cuda_context_broken,
    environment,
    fmt,
    free_memory,
    markdown_table,
    peak_gib,
    peak_reserved_gib,
    reset_peak,
    resolve_device,
    short_error,
    synchronize,
    write_json,
)

import torch  # noqa: E402  (measure puts the repo root on sys.path first)
from torch._inductor import config as inductor_config  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from same_init import (  # noqa: E402
    FIRST_LOSS_RTOL,
    LAST_LOSS_RTOL,
    InitialWeights,
    load_initial_weights,
    loss_agreement,
    take_initial_weights,
    transformers_config,
)

from posttrain.config import config_from_dict  # noqa: E402
from posttrain.losses.ce_grad_kernel import ce_grad_status, l2_programs_per_sm  # noqa: E402
from posttrain.losses.targets import find_target_index  # noqa: E402
from posttrain.metrics import attention_flops, dense_flops_per_token  # noqa: E402
from posttrain.models.common.attention import SDPA_KERNELS  # noqa: E402
from posttrain.models.common.flash_attention_4 import activate_fa4, fa4_unavailable_reason  # noqa: E402
from posttrain.models.hf import spec_for_hf_config  # noqa: E402
from posttrain.models.protocol import param_active_fraction  # noqa: E402
from posttrain.models.registry import ModelSpec, get_model_spec, resolve_args  # noqa: E402
from posttrain.parallelisms.activation_checkpoint import set_activation_memory_budget  # noqa: E402
from posttrain.parallelisms.compile import set_pointwise_recompute  # noqa: E402
from posttrain.parallelisms.float8 import float8_unavailable_reason  # noqa: E402
from posttrain.trainer import Trainer  # noqa: E402

try:
    from posttrain.recipes.sft import sft_loss

    SFT_LOSS_SOURCE = "posttrain.recipes.sft.sft_loss"
except ImportError as _err:  # e.g. torchdata missing on the benchmark machine: the recipe module imports it
    from posttrain.trainer import LossOutput

    SFT_LOSS_SOURCE = f"local copy of sft_loss (import failed: {_err})"

    def sft_loss(model, batch, n_global, *, chunk_size, loss_impl="fused"):  # posttrain.recipes.sft.sft_loss's body
        from posttrain.losses import cross_entropy_for

        output_fn = partial(
            cross_entropy_for(loss_impl), labels=batch["labels"], vocab_size=model.args.vocab_size, chunk_size=chunk_size
        )
        if loss_impl == "fused" and batch.get("target_index") is not None:
            output_fn = partial(output_fn, target_index=batch["target_index"])
        loss_sum, n_targets = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
            output_fn=output_fn,
        )
        return LossOutput(loss_sum=loss_sum, n_targets=n_targets)


BENCH_FLAVOR = "_bench_hf_config"  # a flavor registered at run time for --hf-config shapes
PEERS = ("hf_eager", "hf_compile", "hf_liger", "hf_liger_compile")
MIN_TIMED_STEPS = 3


# --------------------------------------------------------------------------------------------- the shape


@dataclass
class Shape:
    spec: ModelSpec
    args: Any  # the family's args dataclass
    flavor: str  # what posttrain's config names (a registered flavor)
    hf_config: dict[str, Any]
    n_params: int  # parameters one token uses (a MoE's routed experts only), incl. embeddings, real vocab, tied once
    n_causal_matmul: int  # what posttrain's MFU counts: embeddings excluded unless tied to the head

    def describe(self) -> dict[str, Any]:
        a = self.args
        return {
            "family": self.spec.name, "flavor": self.flavor, "dim": a.dim, "n_layers": a.n_layers,
            "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "ffn_dim": a.ffn_dim,
            "vocab_size": a.vocab_size, "padded_vocab_size": a.padded_vocab_size,
            "tie_embeddings": a.tie_embeddings, "n_params": self.n_params,
        }


def resolve_shape(model: str, flavor: str, hf_config_path: str | None) -> Shape:
    if hf_config_path:
        path = Path(hf_config_path)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        spec = spec_for_hf_config(config)
        args = resolve_args(spec, spec.args_from_hf_config(config))
        spec.flavors[BENCH_FLAVOR] = args  # build_training_model looks flavors up by name
        flavor = BENCH_FLAVOR
    else:
        spec = get_model_spec(model)
        args = resolve_args(spec, flavor)
    with torch.device("meta"):
        meta_model = spec.model_cls(resolve_args(spec, args))
    # parameters() yields a tied weight once; a mixture of experts counts the share of its experts one token uses
    total = sum(p.numel() * param_active_fraction(meta_model, name) for name, p in meta_model.named_parameters())
    total = int(total)
    vocab_pad_rows = args.padded_vocab_size - args.vocab_size
    n_params = total - vocab_pad_rows * args.dim * (1 if args.tie_embeddings else 2)
    embed = args.vocab_size * args.dim
    n_causal = n_params if args.tie_embeddings else n_params - embed
    return Shape(spec, args, flavor, spec.hf_config_from_args(args), n_params, n_causal)


def issue_flops_per_token(shape: Shape, seq_len: int) -> float:
    """The issue's one formula for every run: 6 N + 6 L H Dh S."""
    a = shape.args
    return 6.0 * shape.n_params + 6.0 * a.n_layers * a.n_heads * a.head_dim * seq_len


def causal_flops_per_step(shape: Shape, doc_lengths: list[int]) -> float:
    """posttrain's metric (trainer._step_token_stats) for a step over these documents."""
    a = shape.args
    tokens = sum(doc_lengths)
    return dense_flops_per_token(shape.n_causal_matmul) * tokens + attention_flops(
        doc_lengths, a.n_layers, a.n_heads, a.head_dim, causal=True, training=True
    )


# --------------------------------------------------------------------------------------------- the data


@dataclass
class Batches:
    posttrain: list[dict[str, torch.Tensor]]  # input_ids, labels (shifted), position_ids, document_ids, target_index
    hf: list[dict[str, torch.Tensor]]  # input_ids, labels (unshifted: HF shifts inside the loss)
    doc_lengths: list[int]  # per batch (all batches share the layout)


def make_batches(n: int, batch: int, seq_len: int, vocab: int, docs_per_row: int, seed: int, pin: bool) -> Batches:
    """Rows of random token ids, identical for every run. With docs_per_row > 1 each row holds that many
    documents (random lengths): posttrain masks attention per document; the HF peers (sdpa, no varlen) attend
    over the whole row but get the same targets (no prediction across a document boundary)."""
    g = torch.Generator().manual_seed(seed)
    if docs_per_row > 1:
        cuts = torch.randperm(seq_len - 2, generator=g)[: docs_per_row - 1].add(2).sort().values.tolist()
        # keep every document at least 2 tokens long
        bounds = [0]
        for c in cuts:
            if c - bounds[-1] >= 2 and seq_len - c >= 2:
                bounds.append(c)
        bounds.append(seq_len)
    else:
        bounds = [0, seq_len]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    position_ids = torch.cat([torch.arange(length) for length in lengths]).expand(batch, seq_len).contiguous()
    document_ids = torch.cat([torch.full((length,), i) for i, length in enumerate(lengths)])
    document_ids = document_ids.expand(batch, seq_len).contiguous()
    out = Batches([], [], lengths * batch)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        hf_labels = ids.clone()
        for end in bounds[1:-1]:  # the last token of a document predicts nothing
            labels[:, end - 1] = -100
            hf_labels[:, end] = -100
        # the trained positions made with the batch, as posttrain's SFT collate does (no device sync in the loss)
        pt = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids,
              "target_index": find_target_index(labels)}
        hf = {"input_ids": ids, "labels": hf_labels}
        if pin:
            pt = {k: v.pin_memory() for k, v in pt.items()}
            hf = {k: v.pin_memory() for k, v in hf.items()}
        out.posttrain.append(pt)
        out.hf.append(hf)
    return out


def endless(items: list[Any]):
    while True:
        yield from items


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Settings:
    device: torch.device
    dtype: str  # float32 | bfloat16: parameters and optimizer states
    seq_len: int
    batch: int
    steps: int
    warmup: int
    lr: float
    max_grad_norm: float
    peak_flops: float | None
    shape: Shape
    batches: Batches
    deadline: Deadline
    seed: int
    ac: str
    ac_every_n: int
    loss_chunk_size: int
    peer_ac: bool
    hf_attn: str
    peer_sdpa_kernel: str = "auto"
    docs_per_row: int = 1
    initial: InitialWeights = field(default_factory=lambda: InitialWeights(enabled=False))
    profile_dir: Path | None = None
    profile_steps: int = 2
    profile_peers: bool = False
    memory_snapshot_dir: Path | None = None


def timed_run(step: Callable[[], dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Warmup steps (compile happens here), then timed steps; stops early only at the time budget.

    Peak memory is the steady state of the timed steps (reset after warmup, so compile-time transients do
    not count; optimizer states exist by then, gradients are re-created every step)."""
    t0 = time.perf_counter()
    first: dict[str, Any] | None = None
    warmup_done = 0
    for i in range(s.warmup):
        out = step()
        warmup_done += 1
        first = first or out
        if s.deadline.expired() and i >= 1:
            break
    synchronize(s.device)
    warmup_s = time.perf_counter() - t0
    reset_peak(s.device)
    records: list[dict[str, Any]] = []
    # the sampler outside: starting and stopping it is not the steps' time, nor are its collections
    with GpuClockSampler.for_device(s.device) as clocks, StepMarks(s.device) as marks:
        t1 = time.perf_counter()
        for _ in range(s.steps):
            marks.mark()
            records.append(step())
            if s.deadline.expired() and len(records) >= MIN_TIMED_STEPS:
                break
        marks.mark()
        synchronize(s.device)
        elapsed = time.perf_counter() - t1
    peak = peak_gib(s.device)
    reserved = peak_reserved_gib(s.device)
    first = first or (records[0] if records else None)
    n = len(records)
    tokens = n * s.batch * s.seq_len
    tps = tokens / elapsed if elapsed > 0 else None
    result: dict[str, Any] = {
        "status": "ok",
        "timed_steps": n,
        "warmup_steps_s": round(warmup_s, 2),
        "step_ms": 1000 * elapsed / n if n else None,
        "tokens_per_s": tps,
        "peak_mem_gib": peak,
        "peak_reserved_gib": reserved,
        "loss_first": _as_float(first["loss"]) if first and "loss" in first else None,
        # the loss of the last step run (posttrain reads it only on the planned last step: None when cut short)
        "loss_last": _as_float(records[-1]["loss"]) if records and "loss" in records[-1] else None,
        "grad_norm_first": _as_float(first["grad_norm"]) if first and "grad_norm" in first else None,
        "steps_run": warmup_done + n,  # the last loss is comparable between runs with the same count
        **marks.per_step_ms(),
        "gpu_clocks": clocks.summary(),
    }
    if records and "offload/gib" in records[-1]:  # activation offloading: totals since the first logged step
        result["offload"] = {k.split("/", 1)[1]: v for k, v in records[-1].items() if k.startswith("offload/")}
    if tps is not None and s.peak_flops:
        result["mfu_pct"] = 100.0 * issue_flops_per_token(s.shape, s.seq_len) * tps / s.peak_flops
        if records and all("flops" in r for r in records):  # posttrain: its own per-step FLOP count
            flops = sum(r["flops"] for r in records)
        else:
            flops = n * causal_flops_per_step(s.shape, s.batches.doc_lengths)
        result["mfu_causal_pct"] = 100.0 * flops / elapsed / s.peak_flops
    return result


def offload_note(entry: dict[str, Any]) -> str:
    """The run line's activation-offloading part: what went to the host and how it came back."""
    o = entry.get("offload")
    if not o:
        return ""
    return (f", offloaded {o['gib']:.1f} GiB ({o['prefetched']} tensors prefetched, {o['fetched_on_demand']} "
            f"fetched on demand)")


def profile_run(step: Callable[[], dict[str, Any]], s: Settings, name: str) -> dict[str, Any]:
    """--profile: a few more steps under torch.profiler (after the timed ones, so neither timing nor peak memory
    sees it); the text summary (and the chrome trace when small) go to the profile folder."""
    prof, wall_s = profile_steps(step, s.profile_steps, s.device)
    summary = summarize(prof, wall_s, s.profile_steps)
    stem = _stem(s, name)
    title = f"{name}, {s.shape.spec.name} {s.shape.flavor}, seq {s.seq_len} x batch {s.batch}"
    files = write_profile(prof, summary, title, s.profile_dir, stem)
    print(render_summary(title, {**summary, "top": summary["top"][:12]}), flush=True)
    del prof
    return {**{k: v for k, v in summary.items() if k != "top"}, "files": [str(f) for f in files]}


def memory_run(step: Callable[[], dict[str, Any]], s: Settings, name: str,
               reset: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """--memory-snapshot: one more step under the allocator's recorder; the gzipped pickle goes to the folder,
    the largest blocks live at the step's peak (by allocating line) into the JSON and the log. Should the step fail
    while Python stacks are recorded, `reset()` (dropping the failed step's gradients) and one step recorded
    without frames instead (sizes and order still tell where the peak is)."""
    path = s.memory_snapshot_dir / (_stem(s, name) + ".memory.pickle.gz")
    try:
        summary = record_memory_step(step, s.device, path)
    except Exception as err:  # noqa: BLE001 - the recorder's own failure; the step is retried without it
        print(f"[{name}] memory snapshot with Python stacks failed ({type(err).__name__}: {str(err)[:120]}); "
              "recording one more step without frames", flush=True)
        if reset is not None:
            reset()
        summary = record_memory_step(step, s.device, path, python_stacks=False)
    if summary is not None:
        print(f"[{name}] memory at the step's peak (+{summary['peak_above_start_gib']:.2f} GiB over the step's start; "
              f"set by allocation {summary['peak_set_by']['alloc']} of {summary['peak_set_by']['of']}, "
              f"{summary['peak_set_by']['where']}):", flush=True)
        for row in summary["at_peak"]:
            print(f"  {row['gib']:7.3f} GiB in {row['blocks']:4d} blocks  {row['where']}", flush=True)
        print("  largest blocks (MiB): " + ", ".join(f"{b['mib']:.1f}" for b in summary["largest_blocks"]), flush=True)
    return summary


def _stem(s: Settings, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{s.shape.spec.name}_{s.shape.flavor}_{s.seq_len}x{s.batch}_{name}")


def step_spread(entry: dict[str, Any]) -> str:
    """', device step ms median M (min A, max B)' when per-step device times exist, and ', SM clock median C MHz
    (power-capped P%)' when the clock was sampled; else ''."""
    out = ""
    times = entry.get("device_step_ms") or []
    if times:
        out += f", device step ms median {statistics.median(times):.1f} (min {min(times):.1f}, max {max(times):.1f})"
    clocks = entry.get("gpu_clocks")
    if clocks:
        out += (f", SM clock median {clocks['sm_clock_mhz']['median']:.0f} MHz "
                f"(power-capped {100 * clocks['power_capped_share']:.0f}%)")
    return out


def _as_float(x: Any) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


# --------------------------------------------------------------------------------------------- posttrain


@dataclass
class PosttrainVariant:
    name: str
    compile: bool = False
    backend: str = "flex"
    ac: str | None = None  # None: the --ac default
    ac_every_n: int | None = None
    ac_skip_last: int = 0  # activation_checkpoint.skip_last
    ac_offload_blocks: int = 0  # activation_checkpoint.offload_blocks
    memory_budget: float | None = None
    chunk: int | None = None
    loss: str = "fused"
    float8: bool = False
    float8_small_gemms: bool = False
    float8_recipe: str = "rowwise"  # training.float8_recipe
    sdpa_kernel: str = "auto"
    recompute_pointwise: bool = True  # compile.recompute_pointwise's default
    lora_rank: int = 0  # > 0: LoRA of that rank (alpha 2 x rank) on every attention / MLP projection
    cudagraphs: bool = False  # compile.cudagraphs: the compiled blocks replayed as CUDA graphs
    adamw: str = "auto"  # optimizer.fused
    sparse_embedding_grad: bool = False  # training.sparse_embedding_grad
    rms_norm_backward: str = "autograd"  # model.rms_norm_backward
    inductor: tuple[tuple[str, Any], ...] = ()  # torch._inductor.config settings for this run
    ce_l2_programs_per_sm: int = 0  # ce_grad_kernel.L2_PROGRAMS_PER_SM for this run
    blas: str | None = None  # torch.backends.cuda.preferred_blas_library for this run (None: torch's choice)


# adamw= token -> optimizer.fused
ADAMW_TOKENS = {"auto": "auto", "triton": "triton", "torch": "true", "foreach": "false"}


def inductor_setting(text: str) -> tuple[str, Any] | None:
    """`NAME` / `-NAME`: a boolean of torch._inductor.config on / off; `NAME=VALUE`: a bool, int, float or str
    setting, the value read as the setting's own type. Dotted names reach the nested sections
    (`triton.persistent_reductions=0`). None when there is no such setting, the value does not fit it or is empty,
    or the setting's default is None (its type unknown). Values cannot hold commas (they separate variants)."""
    name, equals, value = text.partition("=")
    if equals and not value:
        return None
    off = name.startswith("-") and not value
    name = name.lstrip("-") if off else name
    current = inductor_config.get_config_copy()
    if name not in current:
        return None
    kind = type(current[name])
    if not value:
        return (name, not off) if kind is bool else None
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "on", "off"):
            return None
        return name, value.lower() in ("1", "true", "on")
    if kind in (int, float, str):
        try:
            return name, kind(value)
        except ValueError:
            return None
    return None


def parse_variant(text: str) -> PosttrainVariant:
    v = PosttrainVariant(name=f"posttrain {text}")
    for token in text.split("+"):
        token = token.strip()
        if token in ("compile", "eager"):
            v.compile = token == "compile"
        elif token in ("flex", "sdpa"):
            v.backend = token
        elif token.startswith("ac="):
            v.ac = token[3:]
            if v.ac not in ("none", "full", "selective", "op", "budget"):
                raise SystemExit(f"variant {text!r}: ac must be none, full, selective, op or budget")
        elif token.startswith("every="):
            v.ac_every_n = int(token[6:])
        elif token.startswith("skip=") and token[5:].isdigit():
            v.ac_skip_last = int(token[5:])
        elif token.startswith("offload=") and token[8:].isdigit():
            v.ac_offload_blocks = int(token[8:])
        elif token.startswith("budget="):
            v.memory_budget = float(token[7:])
        elif token.startswith("chunk="):
            v.chunk = int(token[6:])
        elif token in ("loss=fused", "loss=chunked"):
            v.loss = token[5:]
        elif token in ("float8", "float8=all"):
            v.float8, v.float8_small_gemms = True, token == "float8=all"
        elif token in ("float8=tensorwise", "float8=tensorwise-all"):
            v.float8, v.float8_recipe, v.float8_small_gemms = True, "tensorwise", token.endswith("-all")
        elif token.startswith("kernel=") and token[7:] in SDPA_KERNELS:
            v.sdpa_kernel = token[7:]
        elif token in ("recompute=on", "recompute=off"):
            v.recompute_pointwise = token == "recompute=on"
        elif token.startswith("lora=") and token[5:].isdigit() and int(token[5:]) > 0:
            v.lora_rank = int(token[5:])
        elif token == "cudagraphs":
            v.cudagraphs = True
        elif token.startswith("adamw=") and token[6:] in ADAMW_TOKENS:
            v.adamw = ADAMW_TOKENS[token[6:]]
        elif token in ("embgrad=sparse", "embgrad=dense"):
            v.sparse_embedding_grad = token == "embgrad=sparse"
        elif token in ("norm=triton", "norm=autograd"):
            v.rms_norm_backward = token[5:]
        elif token.startswith("inductor=") and (setting := inductor_setting(token[9:])) is not None:
            v.inductor += (setting,)
        elif token in ("blas=cublas", "blas=cublaslt"):
            v.blas = token[5:]
        elif token.startswith("cel2=") and token[5:].isdigit():
            v.ce_l2_programs_per_sm = int(token[5:])
        else:
            raise SystemExit(
                f"variant {text!r}: unknown token {token!r}; use compile|eager, flex|sdpa, "
                "kernel=auto|cudnn|flash|efficient|math|fa4, ac=MODE, every=N, skip=N, offload=N, budget=X, chunk=N, "
                "loss=fused|chunked, float8, float8=all, float8=tensorwise, float8=tensorwise-all, recompute=on|off, "
                "lora=RANK, cudagraphs, "
                "adamw=triton|torch|foreach, embgrad=sparse|dense, norm=triton|autograd, "
                "inductor=[-]NAME or inductor=NAME=VALUE (a torch._inductor.config setting, dotted names too), cel2=K, "
                "blas=cublas|cublaslt"
            )
    return v


class VocabOnlyTokenizer:
    """The Trainer only asks a tokenizer for its size when no data loader of its own is built."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pad_id = 0
        self.eos_id = 0


def posttrain_config(v: PosttrainVariant, s: Settings, output_dir: str):
    cuda = s.device.type == "cuda"
    return config_from_dict({
        "job": {"output_dir": output_dir, "seed": s.seed},
        "model": {"name": s.shape.spec.name, "flavor": s.shape.flavor, "attn_backend": v.backend, "sdpa_kernel": v.sdpa_kernel,
                  "dtype": s.dtype, "rms_norm_backward": v.rms_norm_backward},
        "training": {
            "steps": s.warmup + s.steps, "seq_len": s.seq_len, "batch_size": s.batch, "micro_batch_size": s.batch,
            "device": s.device.type, "mixed_precision": "bf16" if cuda else "fp32",
            "loss_chunk_size": v.chunk if v.chunk is not None else s.loss_chunk_size, "max_grad_norm": s.max_grad_norm,
            "loss_impl": v.loss, "float8": v.float8, "float8_convert_small_gemms": v.float8_small_gemms,
            "float8_recipe": v.float8_recipe, "sparse_embedding_grad": v.sparse_embedding_grad,
        },
        "optimizer": {"lr": s.lr, "fused": v.adamw},
        "lr_scheduler": {"warmup_steps": 0, "decay": "constant"},
        "activation_checkpoint": {
            "mode": v.ac or s.ac, "every_n": v.ac_every_n or s.ac_every_n, "skip_last": v.ac_skip_last,
            "memory_budget": v.memory_budget if v.memory_budget is not None else 0.5,
            "offload_blocks": v.ac_offload_blocks,
        },
        "compile": {"enabled": v.compile, "recompute_pointwise": v.recompute_pointwise, "cudagraphs": v.cudagraphs},
        **({"lora": {"rank": v.lora_rank, "alpha": 2.0 * v.lora_rank}} if v.lora_rank else {}),
        "checkpoint": {"resume": False, "save_final": False, "interval": 0},
        "metrics": {"tensorboard": False, "log_freq": 1_000_000},
    }, source="bench_sft")


def run_posttrain(v: PosttrainVariant, s: Settings) -> dict[str, Any]:
    # graphs compile at the first step: the switches hold for the whole run (dynamo is reset between runs)
    with inductor_config.patch(dict(v.inductor)), l2_programs_per_sm(v.ce_l2_programs_per_sm), \
            preferred_blas(v.blas):
        return _run_posttrain(v, s)


@contextlib.contextmanager
def preferred_blas(name: str | None) -> Iterator[None]:
    """torch's BLAS library for the matmuls of one run (`blas=` token), torch's own choice again after."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def _run_posttrain(v: PosttrainVariant, s: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        cfg = posttrain_config(v, s, tmp)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, tokenizer=VocabOnlyTokenizer(s.shape.args.vocab_size))
        try:
            synchronize(s.device)
            build_s = time.perf_counter() - t0
            if s.initial.needed():  # before the first step, outside the timed window and its memory peak
                take_initial_weights(trainer.model, s.shape.hf_config, f"{v.name}, before its first step", s.initial)
            trainer.set_data_loader(endless(s.batches.posttrain))
            loss_fn = partial(sft_loss, chunk_size=cfg.training.loss_chunk_size, loss_impl=cfg.training.loss_impl)
            calls = [0]

            def step() -> dict[str, Any]:  # logs (reads the loss: a host sync) on the first and the last step only,
                calls[0] += 1  # like fit() between its log steps; the HF peers never read theirs
                return trainer.train_step(loss_fn, log=calls[0] in (1, s.warmup + s.steps))

            result = timed_run(step, s)
            if s.profile_dir is not None:
                result["profile"] = profile_run(step, s, v.name)
            if s.memory_snapshot_dir is not None:
                result["memory_at_peak"] = memory_run(
                    step, s, v.name, reset=lambda: trainer.optimizer.zero_grad(set_to_none=True))
            result["build_s"] = round(build_s, 2)
            result["lora"] = v.lora_rank > 0
            result["float8"] = v.float8
            result["config"] = {
                "compile": v.compile, "attn_backend": v.backend, "sdpa_kernel": v.sdpa_kernel,
                "flash_kernels": flash_kernels(), "ac": cfg.activation_checkpoint.mode,
                "recompute_pointwise": v.recompute_pointwise, "inductor": dict(v.inductor),
                "ce_l2_programs_per_sm": v.ce_l2_programs_per_sm, "blas": v.blas,
                "memory_budget": cfg.activation_checkpoint.memory_budget,
                "loss_chunk_size": cfg.training.loss_chunk_size, "loss_impl": cfg.training.loss_impl, "dtype": s.dtype,
                "float8": v.float8, "float8_convert_small_gemms": v.float8_small_gemms, "float8_recipe": v.float8_recipe,
                "fused_adamw": _fused(trainer.optimizer), "adamw": type(trainer.optimizer).__name__, "sft_loss": SFT_LOSS_SOURCE,
                "ce_grad": ce_grad_status(s.device) if cfg.training.loss_impl == "fused" else None,
                # applied: a tied, trained, unsharded embedding on CUDA (training.sparse_embedding_grad)
                "sparse_embedding_grad": bool(getattr(getattr(trainer.model, "tok_embeddings", None), "row_sparse_grad",
                                                      False)),
            }
            return result
        finally:
            trainer.close()
            del trainer


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def take_initial_weights_untrained(s: Settings) -> None:
    """When a peer runs before any posttrain variant was built (the first one skipped or failed): build a
    posttrain model the way every variant is built (the Trainer, --seed), take its weights, free it. A failure
    is recorded; the peers then keep transformers' own init."""
    v = PosttrainVariant(name="posttrain eager+sdpa (built for its initial weights, never trained)", backend="sdpa")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_sft_init_") as tmp:
            trainer = Trainer(posttrain_config(v, s, tmp), tokenizer=VocabOnlyTokenizer(s.shape.args.vocab_size))
            try:
                take_initial_weights(trainer.model, s.shape.hf_config, v.name, s.initial)
            finally:
                trainer.close()
                del trainer
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the peers still run, from their own init
        s.initial.error = short_error(err)
        print(f"[same init] could not take posttrain's initial weights: {s.initial.error}; the peers keep "
              "transformers' init", flush=True)
    free_memory(s.device, reset_compiler=False)


# --------------------------------------------------------------------------------------------- HF peers


def apply_liger(model_type: str) -> None:
    import liger_kernel.transformers as lt  # noqa: F401  (ImportError -> the peer is skipped)

    fn = {
        "qwen3": "apply_liger_kernel_to_qwen3", "llama": "apply_liger_kernel_to_llama",
        "qwen3_moe": "apply_liger_kernel_to_qwen3_moe",
    }.get(model_type)
    if fn is None or not hasattr(lt, fn):
        raise RuntimeError(f"liger_kernel has no patch for model_type {model_type!r}")
    getattr(lt, fn)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def build_hf_model(s: Settings, liger: bool) -> torch.nn.Module:
    import transformers

    config = transformers_config(s.shape.hf_config)
    if getattr(config, "router_aux_loss_coef", 0) and hasattr(config, "output_router_logits"):
        # posttrain's SFT loss adds router_aux_loss_coef x the load-balancing loss for MoE models; transformers adds
        # it only with output_router_logits (False in Qwen3-MoE's configs): on, both sides train the same objective
        config.output_router_logits = True
    if liger:
        apply_liger(config.model_type)
    dtype = torch.bfloat16 if s.dtype == "bfloat16" else torch.float32
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=s.hf_attn)
        except TypeError:  # older transformers spell it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(
                config, torch_dtype=dtype, attn_implementation=s.hf_attn
            )
    model.to(device=s.device, dtype=dtype)
    if s.initial.tensors is not None:
        load_initial_weights(model, s.initial)
    model.train()
    if s.peer_ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def hf_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """The same AdamW as posttrain.optim.build_optimizer: decay on matrices only, fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    fused = s.device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=None if fused else True,
    )


def flash_kernels() -> str:
    """Whose kernels SDPA's flash entry runs now: once a run switched them to FA4 they stay so for the process."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", lambda: None)()
    return current or "torch's own (FlashAttention-2)"


def peer_attention_kernel(s: Settings) -> Callable[[], Any]:
    """The context the peers' forward and backward run in: torch's own SDPA choice, or one kernel pinned
    (--peer-sdpa-kernel; fa4 switches the process's flash kernels to FlashAttention-4, as posttrain's fa4 does)."""
    backend = SDPA_KERNELS[s.peer_sdpa_kernel]
    if backend is None:
        return contextlib.nullcontext
    if s.peer_sdpa_kernel == "fa4":
        activate_fa4()
    return partial(sdpa_kernel, [backend])


def run_hf(peer: str, s: Settings) -> dict[str, Any]:
    # posttrain's partitioner settings are process-wide: the compiled peers get torch's defaults
    set_activation_memory_budget(1.0)
    set_pointwise_recompute(False)
    liger = "liger" in peer
    compiled = peer.endswith("compile")
    if s.initial.needed():
        take_initial_weights_untrained(s)
    t0 = time.perf_counter()
    model = build_hf_model(s, liger)
    optimizer = hf_optimizer(model, s)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compiled else model
    synchronize(s.device)
    build_s = time.perf_counter() - t0
    data = endless(s.batches.hf)
    kernel = peer_attention_kernel(s)

    def step() -> dict[str, Any]:
        b = next(data)
        ids = b["input_ids"].to(s.device, non_blocking=True)
        labels = b["labels"].to(s.device, non_blocking=True)
        with kernel():
            loss = forward(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    try:
        result = timed_run(step, s)
        if s.profile_dir is not None and s.profile_peers:
            result["profile"] = profile_run(step, s, peer)
        if s.memory_snapshot_dir is not None and s.profile_peers:
            result["memory_at_peak"] = memory_run(step, s, peer, reset=lambda: optimizer.zero_grad(set_to_none=True))
    finally:
        del forward, optimizer, params, model
    result["build_s"] = round(build_s, 2)
    result["init"] = "posttrain's initial weights" if s.initial.tensors is not None else "transformers' own"
    result["config"] = {
        "compile": compiled, "liger": liger, "attn_implementation": s.hf_attn, "sdpa_kernel": s.peer_sdpa_kernel,
        "flash_kernels": flash_kernels(),
        "dtype": s.dtype,
        "fused_adamw": s.device.type == "cuda", "gradient_checkpointing": s.peer_ac,
    }
    return result


# --------------------------------------------------------------------------------------------- reporting


def ratio_rows(results: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    ours = [r for r in results if r["kind"] == "posttrain" and r["status"] == "ok"]
    peers = [r for r in results if r["kind"] == "peer" and r["status"] == "ok"]
    rows = []
    for o in ours:
        for p in peers:
            rows.append({
                "posttrain": o["name"], "peer": p["name"],
                "tokens_per_s_ratio": _div(o.get("tokens_per_s"), p.get("tokens_per_s")),
                "peak_mem_ratio": _div(o.get("peak_mem_gib"), p.get("peak_mem_gib")),
                "loss": loss_agreement(o, p, comparable=why_not_comparable(o, p, s)),
            })
    return rows


def why_not_comparable(ours: dict[str, Any], peer: dict[str, Any], s: Settings) -> str | None:
    """Why a peer's losses need not equal a posttrain run's (no verdict then), or None."""
    if not s.initial.enabled:
        return "--no-same-init: each side starts from its own init"
    if peer.get("init") != "posttrain's initial weights":
        return f"the peer started from transformers' init ({s.initial.error or 'no initial weights'})"
    if s.docs_per_row > 1:
        return "--docs-per-row > 1: the HF peers attend across documents, posttrain does not"
    if ours.get("float8"):
        return "float8 matmuls, not the peers' bf16 computation"
    return None


def loss_cell(agreement: dict[str, Any]) -> str:
    """The `loss vs peer` cell: absolute (relative) differences of the first-step and the last loss, the verdict."""
    def diff(key: str) -> str:
        a, r = agreement.get(f"{key}_abs_diff"), agreement.get(f"{key}_rel_diff")
        return "-" if a is None else f"{a:.1e} ({100 * r:.2f}%)"

    last = diff("loss_last")
    if agreement.get("last_not_compared"):
        last += f", not compared: {agreement['last_not_compared']}"
    verdict = {True: "agree", False: "DIFFER", None: "no verdict"}[agreement.get("agree")]
    return f"first {diff('loss_first')}, last {last}: {verdict}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render(results: list[dict[str, Any]], shape: Shape, s: Settings) -> str:
    peers = [r for r in results if r["kind"] == "peer" and r["status"] == "ok"]
    fastest = max(peers, key=lambda r: r["tokens_per_s"] or 0, default=None)
    leanest = min(peers, key=lambda r: r["peak_mem_gib"] if r["peak_mem_gib"] is not None else math.inf, default=None)
    a = shape.args
    lines = [
        f"### SFT step: {shape.spec.name} {shape.flavor if shape.flavor != BENCH_FLAVOR else '(--hf-config)'} "
        f"(N = {shape.n_params / 1e9:.3f} B params one token uses, incl. embeddings, L={a.n_layers} H={a.n_heads} Dh={a.head_dim}), "
        f"seq {s.seq_len} x batch {s.batch}, {s.dtype} params + AdamW states, device {s.device}",
        f"MFU = (6N + 6 L H Dh S) x tokens/s / {s.peak_flops / 1e12:.0f} TFLOP/s; causal MFU = posttrain's metric "
        "(counts computed FLOPs: causal attention, head once)" if s.peak_flops else "MFU: no peak FLOP/s on this device",
        init_line(s),
        "",
    ]
    headers = ["run", "tokens/s", "MFU %", "causal MFU %", "peak mem GiB", "step ms", "timed steps",
               "warmup s", "loss first/last", "vs fastest peer", "mem vs leanest peer", "status"]
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append([
            r["name"],
            fmt(r.get("tokens_per_s"), ",.0f"),
            fmt(r.get("mfu_pct")),
            fmt(r.get("mfu_causal_pct")),
            fmt(r.get("peak_mem_gib")),
            fmt(r.get("step_ms")),
            fmt(r.get("timed_steps"), "d"),
            fmt(r.get("warmup_steps_s")),
            f"{fmt(r.get('loss_first'), '.3f')}/{fmt(r.get('loss_last'), '.3f')}" if ok else "-",
            _times(_div(r.get("tokens_per_s"), fastest["tokens_per_s"])) if ok and fastest else "-",
            _times(_div(r.get("peak_mem_gib"), leanest["peak_mem_gib"])) if ok and leanest else "-",
            "ok" if ok else f"{r['status']}: {r.get('reason', '')}",
        ])
    lines.append(markdown_table(headers, rows))
    ratios = ratio_rows(results, s)
    if ratios:
        lines += ["", "posttrain / peer:", ""]
        lines.append(markdown_table(
            ["posttrain", "peer", "tokens/s ratio", "peak memory ratio", "loss vs peer (abs diff, first / last step)"],
            [[x["posttrain"], x["peer"], _times(x["tokens_per_s_ratio"]), _times(x["peak_mem_ratio"]),
              loss_cell(x["loss"])] for x in ratios],
        ))
    ours = [r for r in results if r["kind"] == "posttrain" and r["status"] == "ok"]
    best = max(ours, key=lambda r: r["tokens_per_s"] or 0, default=None)
    if best is not None:
        lines += ["", f"best posttrain run: {best['name']}: {fmt(best.get('tokens_per_s'), ',.0f')} tokens/s, "
                      f"MFU {fmt(best.get('mfu_pct'))}%"]
        if best.get("mfu_pct") is not None:
            lines.append(f"- target MFU >= 50%: {'MET' if best['mfu_pct'] >= 50 else 'not met'}")
        if fastest:
            q = _div(best["tokens_per_s"], fastest["tokens_per_s"])
            lines.append(f"- target tokens/s >= 1.3 x fastest peer ({fastest['name']}): {q:.2f}x "
                         f"{'MET' if q >= 1.3 else 'not met'}")
        if leanest and best.get("peak_mem_gib") is not None and leanest.get("peak_mem_gib") is not None:
            lines.append(f"- target peak memory <= leanest peer ({leanest['name']}, {leanest['peak_mem_gib']:.1f} "
                         f"GiB): {best['peak_mem_gib']:.1f} GiB "
                         f"{'MET' if best['peak_mem_gib'] <= leanest['peak_mem_gib'] else 'not met'}")
    if ratios:
        lines.append(same_computation_line(ratios, s))
    return "\n".join(lines)


def init_line(s: Settings) -> str:
    w = s.initial
    if not w.enabled:
        return "initial weights: each side its own (--no-same-init; posttrain's depth-scaled init, transformers' std 0.02)"
    if w.tensors is None:
        return f"initial weights: the peers could not get posttrain's ({w.error or 'no run took them'})"
    return f"initial weights: posttrain's (--seed {s.seed}, taken from {w.source}) loaded into every HF peer"


def same_computation_line(ratios: list[dict[str, Any]], s: Settings) -> str:
    tol = (f"first-step loss within {100 * FIRST_LOSS_RTOL:.1f}%, loss after the same steps within "
           f"{100 * LAST_LOSS_RTOL:.0f}% (relative; why: benchmarks/same_init.py)")
    verdicts = [x["loss"].get("agree") for x in ratios]
    if all(v is None for v in verdicts):
        return f"- same computation, {tol}: not checked ({ratios[0]['loss'].get('why_no_verdict')})"
    differ = [f"{x['posttrain']} vs {x['peer']}" for x in ratios if x["loss"].get("agree") is False]
    unchecked = sum(v is None for v in verdicts)
    text = (f"- same computation (same initial weights), {tol}: "
            + (f"DIFFER on {len(differ)} of {len(ratios)} pairs ({'; '.join(differ)})" if differ
               else f"agree on all {len(ratios) - unchecked} checked pairs"))
    return text + (f", {unchecked} without a verdict" if unchecked else "")


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3", help="posttrain family (qwen3, llama3)")
    p.add_argument("--flavor", default="1.7B", help="named size of the family (debug, 0.6B, 1.7B, 8B, 1B, ...)")
    p.add_argument("--hf-config", default=None,
                   help="take the shape from an HF config.json (file or folder) instead of --model/--flavor; "
                        "weights stay random")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="parameter and AdamW state dtype, the same for every run")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="rows per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run (compile happens here)")
    p.add_argument("--posttrain-variants", default="compile+flex,eager+sdpa",
                   help="comma-separated; tokens joined by '+': compile|eager, flex|sdpa, ac=MODE, every=N, budget=X, chunk=N, "
                        "loss=fused|chunked, float8, float8=all, adamw=triton|torch|foreach, embgrad=sparse|dense, "
                        "norm=triton|autograd, inductor=[-]NAME[=VALUE], cel2=K, blas=cublas|cublaslt (the module docstring lists every "
                        "token; '' for none)")
    p.add_argument("--peers", default="hf_eager,hf_compile,hf_liger",
                   help=f"comma-separated subset of {','.join(PEERS)} ('' for none)")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective", "op", "budget"),
                   help="posttrain activation checkpointing for variants without an ac= token")
    p.add_argument("--ac-every-n", type=int, default=2)
    p.add_argument("--peer-ac", action="store_true", help="HF gradient checkpointing for the peers (e.g. 8B)")
    p.add_argument("--hf-attn", default="sdpa", help="attn_implementation of the HF peers")
    p.add_argument("--peer-sdpa-kernel", default="auto", choices=sorted(SDPA_KERNELS),
                   help="the SDPA kernel the HF peers run (auto: torch's choice; fa4: FlashAttention-4, as posttrain's "
                        "kernel=fa4 token)")
    p.add_argument("--docs-per-row", type=int, default=1,
                   help="documents packed per row (posttrain masks per document; HF peers attend the whole row)")
    p.add_argument("--loss-chunk-size", type=int, default=0, help="training.loss_chunk_size (0 = auto)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak for MFU on CUDA (H100/H200: 989)")
    p.add_argument("--time-budget-s", type=float, default=480.0, help="wall-clock budget for the whole script")
    p.add_argument("--min-run-s", type=float, default=25.0, help="skip an eager run when less than this is left")
    p.add_argument("--min-compile-run-s", type=float, default=90.0,
                   help="skip a compiled run when less than this is left (compilation cannot be cut short)")
    p.add_argument("--allow-cpu-compile", action="store_true", help="run compile variants/peers on the CPU too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-same-init", dest="same_init", action="store_false",
                   help="let the HF peers keep transformers' own init instead of loading posttrain's initial weights "
                        "(then their losses are not comparable)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after each posttrain run's timed steps, profile --profile-steps more steps: a text summary "
                        "(top kernels, time per category, GPU idle) and, when small, the gzipped chrome trace in DIR")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-peers", action="store_true", help="--profile (and --memory-snapshot) the HF peers too")
    p.add_argument("--memory-snapshot", default=None, metavar="DIR",
                   help="CUDA: record the allocator over one more step of each posttrain run; gzipped snapshot in DIR, "
                        "the largest blocks live at the step's peak in the JSON")
    p.add_argument("--out", default=None, help="JSON results file")
    return p.parse_args(argv)


def plan_runs(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, Any, str | None, float]]:
    """(kind, name, what, skip reason, seconds it needs) in run order.

    The first posttrain variant (the headline) runs first, then the peers (Liger ones last: their patch of
    transformers' classes stays for the rest of the process; posttrain is not affected), then the other
    posttrain variants. So under a tight budget the headline comparisons are the ones that get done.
    """
    ours: list[tuple[str, str, Any, str | None, float]] = []
    for text in [t for t in args.posttrain_variants.split(",") if t.strip()]:
        v = parse_variant(text.strip())
        skip = float8_unavailable_reason(device) if v.float8 else None
        if skip is None and v.sdpa_kernel == "fa4":
            skip = fa4_unavailable_reason()
        if skip is None and device.type == "cpu" and v.backend == "flex":
            skip = "flex has no backward on CPU"
        elif skip is None and device.type == "cpu" and v.compile and not args.allow_cpu_compile:
            skip = "compile skipped on CPU (--allow-cpu-compile)"
        ours.append(("posttrain", v.name, v, skip, args.min_compile_run_s if v.compile else args.min_run_s))
    kernels = {v.sdpa_kernel for *_, v, _, _ in ours} | {args.peer_sdpa_kernel}
    if "fa4" in kernels and "flash" in kernels:  # FA4, once on, replaces the flash kernels for the process
        raise SystemExit("kernel=flash and fa4 (a variant's or --peer-sdpa-kernel) in one run: the flash runs after "
                         "the first fa4 one would run FA4; run them in two invocations")
    peers = [t.strip() for t in args.peers.split(",") if t.strip()]
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; choose from {PEERS}")
    peers.sort(key=lambda x: ("liger" in x, x.endswith("compile") and "liger" in x))  # stable: Liger last
    theirs: list[tuple[str, str, Any, str | None, float]] = []
    for peer in peers:
        skip = None
        if device.type == "cpu" and peer.endswith("compile") and not args.allow_cpu_compile:
            skip = "compile skipped on CPU (--allow-cpu-compile)"
        if "liger" in peer and skip is None:
            try:
                import liger_kernel  # noqa: F401
            except ImportError as err:
                skip = f"liger_kernel not importable ({err})"
        need = args.min_compile_run_s if peer.endswith("compile") else args.min_run_s * (2 if "liger" in peer else 1)
        theirs.append(("peer", peer, peer, skip, need))
    return ours[:1] + theirs + ours[1:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    deadline = Deadline(args.time_budget_s)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = resolve_shape(args.model, args.flavor, args.hf_config)
    n_batches = max(1, min(4, args.steps + args.warmup))
    batches = make_batches(n_batches, args.batch, args.seq_len, shape.args.vocab_size, args.docs_per_row,
                           args.seed, pin=device.type == "cuda")
    s = Settings(
        device=device, dtype=args.dtype, seq_len=args.seq_len, batch=args.batch, steps=args.steps,
        warmup=args.warmup, lr=args.lr, max_grad_norm=args.max_grad_norm,
        peak_flops=args.peak_tflops * 1e12 if device.type == "cuda" else None, shape=shape, batches=batches,
        deadline=deadline, seed=args.seed, ac=args.ac, ac_every_n=args.ac_every_n,
        loss_chunk_size=args.loss_chunk_size, peer_ac=args.peer_ac, hf_attn=args.hf_attn,
        peer_sdpa_kernel=args.peer_sdpa_kernel,
        docs_per_row=args.docs_per_row, initial=InitialWeights(enabled=args.same_init),
        profile_dir=Path(args.profile) if args.profile else None, profile_steps=max(1, args.profile_steps),
        profile_peers=args.profile_peers, memory_snapshot_dir=Path(args.memory_snapshot) if args.memory_snapshot else None,
    )
    report: dict[str, Any] = {
        "benchmark": "bench_sft", "env": environment(device), "shape": shape.describe(),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        "flops_per_token_issue_formula": issue_flops_per_token(shape, args.seq_len),
        "sft_loss": SFT_LOSS_SOURCE, "same_init": s.initial.describe(), "results": [],
    }
    print(f"shape: {json.dumps(shape.describe())}", flush=True)
    broken_by: str | None = None
    for kind, name, what, skip, need_s in plan_runs(args, device):
        entry: dict[str, Any] = {"name": name, "kind": kind}
        if skip is None and broken_by is not None:
            skip = f"CUDA context broken by {broken_by}"
        if skip is None and deadline.remaining() < need_s:
            skip = f"time budget: {deadline.remaining():.0f} s of {args.time_budget_s:.0f} s left, run needs ~{need_s:.0f} s"
        if skip is not None:
            entry.update(status="skipped", reason=skip)
            print(f"[{name}] skipped: {skip}", flush=True)
        else:
            print(f"[{name}] running ({deadline.remaining():.0f} s of budget left)", flush=True)
            t0 = time.perf_counter()
            try:
                entry.update(run_posttrain(what, s) if kind == "posttrain" else run_hf(what, s))
            except (Exception, SystemExit) as err:  # noqa: BLE001 - one crash must not end the benchmark
                entry.update(status="failed", reason=short_error(err))
                entry["traceback"] = traceback.format_exc(limit=8)
                print(f"[{name}] failed: {entry['reason']}", flush=True)
                print(entry["traceback"], flush=True)
                del err
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
            free_memory(device)
            if entry["status"] != "ok":
                why = cuda_context_broken(device)
                if why:
                    broken_by = f"{name} ({why})"
            else:
                print(f"[{name}] {fmt(entry.get('tokens_per_s'), ',.0f')} tokens/s, MFU {fmt(entry.get('mfu_pct'))}%, "
                      f"causal MFU {fmt(entry.get('mfu_causal_pct'))}%, peak {fmt(entry.get('peak_mem_gib'))} GiB "
                      f"(reserved {fmt(entry.get('peak_reserved_gib'))}), "
                      f"loss {fmt(entry.get('loss_first'), '.3f')} -> {fmt(entry.get('loss_last'), '.3f')}, "
                      f"{entry['wall_s']} s{step_spread(entry)}{offload_note(entry)}", flush=True)
        report["results"].append(entry)
        report["ratios"] = ratio_rows(report["results"], s)
        report["same_init"] = s.initial.describe()
        write_json(args.out, report)
    report["total_s"] = round(deadline.elapsed(), 1)
    write_json(args.out, report)
    print(f"\n{RESULTS_MARKER} bench_sft ({report['total_s']} s)")
    print(render(report["results"], shape, s), flush=True)
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
