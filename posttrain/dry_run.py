"""`--job.dry_run`: what a run would be, without running it. Prints the resolved config, parameter counts
(total, trainable, active per token), a per-GPU memory estimate and the parallel layout, then returns.

The model is built on the meta device only (no memory, no weights read), so this is instant for any size
and needs no GPU. The world size is taken from WORLD_SIZE (as under torchrun) and defaults to 1:
`WORLD_SIZE=64 python train.py --config train_configs/llama3_8b_sft.toml --job.dry_run true`.

The memory estimate is a planning number (about +-30%), not a measurement: sharded fp32/bf16 weights,
gradients and AdamW state, plus the gathered weights of the block FSDP is working on, plus activations (without
those of `activation_checkpoint.offload_blocks`, which wait in host memory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from posttrain.config import JobConfig, config_to_dict
from posttrain.losses.fused_head import chunk_rows
from posttrain.models import protocol as model_hooks
from posttrain.models.registry import get_model_spec, resolve_args, resolve_scratch_args
from posttrain.parallelisms import ParallelDims

GIB = 1024**3


@dataclass
class ParamCounts:
    total: int
    trainable: int
    active: int  # used for one token: MoE experts count top_k / n_experts of their parameters


def count_parameters(model: nn.Module) -> ParamCounts:
    """A mixture-of-experts model says which share of a weight one token uses (`param_active_fraction`)."""
    total = trainable = 0
    active = 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        active += p.numel() * model_hooks.param_active_fraction(model, name)
    return ParamCounts(total, trainable, int(active))


def _model_args(cfg: JobConfig):
    m = cfg.model
    if m.hf_path:
        from posttrain.models.hf import read_hf_config, spec_for_hf_config

        folder = Path(m.hf_path).expanduser()
        if not folder.is_dir():  # a hub id: fetch config.json only
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(m.hf_path, "config.json")).parent
        hf_config = read_hf_config(folder)
        spec = spec_for_hf_config(hf_config)
        return spec, resolve_args(spec, spec.args_from_hf_config(hf_config))
    spec = get_model_spec(m.name)
    return spec, resolve_scratch_args(spec, m.flavor, vocab_size=m.vocab_size, overrides=m.overrides)


def estimate_memory_gib(cfg: JobConfig, args, counts: ParamCounts, dims: ParallelDims, on_gpu: bool) -> dict[str, float]:
    """Per-GPU memory in GiB by part (see the module docstring for what is counted)."""
    t = cfg.training
    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if on_gpu else "fp32")
    param_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    compute_bytes = 2 if mixed == "bf16" or cfg.model.dtype == "bfloat16" else 4
    shard = dims.dp_shard * dims.tp  # FSDP shards over dp_shard, TP splits the rest; replicas hold copies
    weights = counts.total * param_bytes / shard
    grads = counts.trainable * param_bytes / shard
    adam = 2 * counts.trainable * param_bytes / shard
    per_block = (counts.total - 2 * args.padded_vocab_size * args.dim) / max(args.n_layers, 1)
    gathered = 2 * per_block * compute_bytes / dims.tp if dims.fsdp_enabled else 0.0  # current + prefetched block
    micro = t.micro_batch_size or max(1, t.batch_size // dims.dp_degree)
    tokens = micro * t.seq_len
    kv_dim = args.n_kv_heads * args.head_dim
    q_dim = args.n_heads * args.head_dim
    # Saved per token and layer: norms' inputs, q/k/v, attention output, SwiGLU's three ffn-wide tensors.
    per_token_layer = (4 * args.dim + 2 * q_dim + 2 * kv_dim + 3 * args.ffn_dim) * compute_bytes / dims.tp
    ac = cfg.activation_checkpoint
    mode = ac.mode
    # the first n_layers - skip_last blocks are the ones the mode wraps; the last skip_last keep everything
    eligible = args.n_layers - min(ac.skip_last, args.n_layers) if mode in ("full", "selective", "op") else args.n_layers
    if mode == "full":
        # wrapped blocks keep their inputs; the last (unwrapped) blocks keep everything, and their backward, which
        # runs first, frees it before the first wrapped block is recomputed (one at a time)
        recomputed = 1 if eligible else 0
        activations = tokens * (args.dim * compute_bytes * eligible
                                + per_token_layer * max(args.n_layers - eligible, recomputed))
    elif mode == "budget":  # the partitioner's ceiling; it may keep less
        activations = tokens * per_token_layer * args.n_layers * ac.memory_budget
    else:
        wrapped = eligible // ac.every_n if mode == "selective" else 0
        activations = tokens * per_token_layer * (args.n_layers - wrapped)
    if ac.offload_blocks and on_gpu:  # those blocks' saved tensors wait in pinned host memory, not on the GPU
        offloaded = tokens * per_token_layer * min(ac.offload_blocks, args.n_layers)
        activations = max(0.0, activations - offloaded * (ac.memory_budget if mode == "budget" else 1.0))
    if t.loss_impl == "fused":  # one chunk's logits in the matmul dtype (turned into their gradient in place)
        rows = chunk_rows(t.loss_chunk_size, args.padded_vocab_size, compute_bytes)
        loss = min(rows, tokens) * args.padded_vocab_size * compute_bytes
    else:  # one chunk's fp32 logits + grads
        loss = min(t.loss_chunk_size or 4096, tokens) * args.padded_vocab_size * 4 * 2
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": adam,
        "gathered_blocks": gathered,
        "activations": activations,
        "loss_chunk": loss,
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def dry_run(cfg: JobConfig, *, world_size: int | None = None) -> dict:
    """Print the plan of a run and return it as a dict (nothing is allocated, nothing is launched)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    spec, args = _model_args(cfg)
    with torch.device("meta"):
        model = spec.model_cls(args)
    counts = count_parameters(model)
    on_gpu = cfg.training.device != "cpu"  # "auto": planned for GPUs (a dry run is often made on a login node)
    memory = estimate_memory_gib(cfg, args, counts, dims, on_gpu)
    micro = cfg.training.micro_batch_size or max(1, cfg.training.batch_size // dims.dp_degree)
    grad_accum = cfg.training.batch_size // (micro * dims.dp_degree) if micro * dims.dp_degree else 0
    layout = {
        "world_size": world_size,
        "dp_replicate": dims.dp_replicate,
        "dp_shard": dims.dp_shard,
        "tp": dims.tp,
        "fsdp": dims.fsdp_enabled,
        "hsdp": dims.hsdp_enabled,
        "micro_batch_size": micro,
        "grad_accum": grad_accum,
        "activation_checkpoint": cfg.activation_checkpoint.mode,
        "compile": cfg.compile.enabled,
    }
    plan = {
        "model": {"family": spec.name, "layers": args.n_layers, "dim": args.dim, "vocab": args.vocab_size},
        "parameters": {"total": counts.total, "trainable": counts.trainable, "active": counts.active},
        "memory_per_gpu_gib": {k: round(v, 2) for k, v in memory.items()},
        "parallel_layout": layout,
    }
    print("== resolved config ==")
    print(json.dumps(config_to_dict(cfg), indent=2))
    print("== dry run ==")
    print(f"model: {spec.name}, {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}")
    print(
        f"parameters: total {counts.total:,} | trainable {counts.trainable:,} | active per token {counts.active:,}"
    )
    print(
        "memory per GPU (estimate, GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
        + f" -> total {memory['total']:.2f}"
    )
    print(
        f"parallel layout: world {world_size} = dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x "
        f"tp {dims.tp}; micro-batch {micro} x grad_accum {grad_accum} x dp {dims.dp_degree} = "
        f"batch {cfg.training.batch_size} rows of {cfg.training.seq_len}"
    )
    print(json.dumps(plan))
    return plan
