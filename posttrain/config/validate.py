"""Checks that need more than a value's type: ranges, and keys that must agree with each other.

Each failure is a ConfigError whose `key` is the setting to change; the loader adds the file (or
"command line") that set it.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

from posttrain.config.errors import ConfigError
from posttrain.config.sections import DATA_COLUMN_FIELDS

if TYPE_CHECKING:
    from posttrain.config.loader import JobConfig


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {reason}", key=key)


def _positive(value: float, key: str) -> None:
    _require(value > 0, key, f"must be > 0, got {value}")


def _non_negative(value: float, key: str) -> None:
    _require(value >= 0, key, f"must be >= 0, got {value}")


def validate(cfg: "JobConfig", *, world_size: int | None = None) -> None:
    """Raise ConfigError naming the first key whose value cannot work.

    With `world_size` (known once the process group is up) also checks the parallel degrees against it
    and that the global batch splits evenly over the data-parallel ranks and micro-batches.
    """
    _validate_job(cfg)
    _validate_extensible(cfg)
    _validate_data(cfg)
    _validate_training(cfg)
    _validate_optimizer(cfg)
    _validate_parallelism(cfg)
    _validate_float8(cfg)
    _validate_cudagraphs(cfg)
    ac, ckpt, metrics = cfg.activation_checkpoint, cfg.checkpoint, cfg.metrics
    _positive(ac.every_n, "activation_checkpoint.every_n")
    _non_negative(ac.skip_last, "activation_checkpoint.skip_last")
    _non_negative(ac.offload_blocks, "activation_checkpoint.offload_blocks")
    if ac.offload_blocks:
        _require(ac.mode != "selective", "activation_checkpoint.offload_blocks",
                 "works with mode none, full, op or budget (selective leaves scattered blocks unwrapped)")
        if ac.mode in ("full", "op"):
            _require(ac.offload_blocks <= ac.skip_last, "activation_checkpoint.offload_blocks",
                     f"= {ac.offload_blocks} exceeds skip_last = {ac.skip_last}: only unwrapped blocks offload")
    _require(
        0 <= ac.memory_budget <= 1, "activation_checkpoint.memory_budget", f"must be in [0, 1], got {ac.memory_budget}"
    )
    if ac.mode == "budget":
        _require(cfg.compile.enabled, "activation_checkpoint.mode", "= 'budget' works through torch.compile; set compile.enabled = true")
    _non_negative(ckpt.interval, "checkpoint.interval")
    _non_negative(ckpt.keep_last, "checkpoint.keep_last")
    _positive(metrics.log_freq, "metrics.log_freq")
    if metrics.peak_tflops is not None:
        _positive(metrics.peak_tflops, "metrics.peak_tflops")
    if world_size is not None:
        validate_world_size(cfg, world_size)


def _validate_job(cfg: "JobConfig") -> None:
    _require(cfg.job.output_dir.strip() != "", "job.output_dir", "must not be empty")
    _require(
        cfg.model.name.strip() != "" or cfg.model.hf_path.strip() != "",
        "model.name",
        "must name a model family (or set model.hf_path)",
    )


RECIPES = ("sft", "dpo", "reward_model", "distill", "grpo")
DATA_FORMATS = ("auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text", "tokens")
LOSSES = ("cross_entropy",)


def _builtin_or_import_path(value: str, builtins: tuple[str, ...], key: str) -> None:
    """A built-in name, or user code as `module:attr` (see posttrain/extensions.py)."""
    if value in builtins or ":" in value:
        return
    from posttrain.config.schema import suggest

    raise ConfigError(
        f"{key} must be one of {', '.join(builtins)} or 'module:attr' naming your own code; got {value!r}"
        f"{suggest(value, list(builtins))}",
        key=key,
    )


def _validate_extensible(cfg: "JobConfig") -> None:
    _builtin_or_import_path(cfg.job.recipe, RECIPES, "job.recipe")
    _builtin_or_import_path(cfg.data.format, DATA_FORMATS, "data.format")
    _builtin_or_import_path(cfg.training.loss, LOSSES, "training.loss")
    m = cfg.model
    _non_negative(m.vocab_size, "model.vocab_size")
    if m.hf_path:
        _require(m.vocab_size == 0, "model.vocab_size", "sizes a model built from scratch; unset it with model.hf_path")
        _require(not m.overrides, "model.overrides", "size a model built from scratch; unset them with model.hf_path")


def _validate_data(cfg: "JobConfig") -> None:
    data = cfg.data
    for field, column in data.columns.items():  # key "data.columns": the error names the file that set it
        if field not in DATA_COLUMN_FIELDS:
            raise ConfigError(f"data.columns.{field} is not a field the formats read; map one of "
                              f"{', '.join(DATA_COLUMN_FIELDS)}", key="data.columns")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"data.columns.{field} must be the name of a column of your rows, got {column!r}",
                              key="data.columns")
    _require(
        not (data.path and data.paths),
        "data.paths",
        "and data.path are both set; use data.path for one dataset or data.paths to mix several",
    )
    if data.weights:
        _require(
            len(data.weights) == len(data.paths),
            "data.weights",
            f"has {len(data.weights)} entries but data.paths has {len(data.paths)}; give one weight per path",
        )
        for w in data.weights:
            _require(math.isfinite(w) and w >= 0, "data.weights", f"must all be finite and >= 0, got {w}")
        _require(sum(data.weights) > 0, "data.weights", "must not all be 0")
    _positive(data.pack_buffer, "data.pack_buffer")
    _non_negative(data.shuffle_buffer, "data.shuffle_buffer")
    _non_negative(data.num_workers, "data.num_workers")
    _positive(data.prefetch, "data.prefetch")


def _validate_training(cfg: "JobConfig") -> None:
    t = cfg.training
    _positive(t.steps, "training.steps")
    _positive(t.seq_len, "training.seq_len")
    _positive(t.batch_size, "training.batch_size")
    _non_negative(t.micro_batch_size, "training.micro_batch_size")
    if t.micro_batch_size > 0:
        _require(
            t.batch_size % t.micro_batch_size == 0,
            "training.micro_batch_size",
            f"({t.micro_batch_size}) must divide training.batch_size ({t.batch_size})",
        )
    _require(
        math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0,
        "training.max_grad_norm",
        f"must be >= 0 (0 = off), got {t.max_grad_norm}",
    )
    _non_negative(t.loss_chunk_size, "training.loss_chunk_size")
    s = cfg.lr_scheduler
    _non_negative(s.warmup_steps, "lr_scheduler.warmup_steps")
    _require(0 <= s.min_lr_ratio <= 1, "lr_scheduler.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")


def _validate_optimizer(cfg: "JobConfig") -> None:
    o = cfg.optimizer
    _require(math.isfinite(o.lr) and o.lr >= 0, "optimizer.lr", f"must be >= 0, got {o.lr}")
    _non_negative(o.weight_decay, "optimizer.weight_decay")
    _require(0 <= o.beta1 < 1, "optimizer.beta1", f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optimizer.beta2", f"must be in [0, 1), got {o.beta2}")
    _positive(o.eps, "optimizer.eps")


def _validate_parallelism(cfg: "JobConfig") -> None:
    p = cfg.parallelism
    _positive(p.dp_replicate, "parallelism.dp_replicate")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, "parallelism.dp_shard", f"must be -1 or >= 1, got {p.dp_shard}")
    _positive(p.tp, "parallelism.tp")


FLOAT8_INSTALL_HINT = "pip install 'posttrain[float8]' (or pip install 'torchao>=0.18')"


def _validate_float8(cfg: "JobConfig") -> None:
    """What training.float8 needs besides float8 hardware (checked where the device is known)."""
    if not cfg.training.float8:
        return
    key = "training.float8"
    _require(cfg.model.backend == "native", key, "works with model.backend = 'native' only; set it to false")
    _require(cfg.lora.rank == 0, key, "converts full fine-tuning's Linear layers; it cannot be combined with LoRA (lora.rank > 0)")
    _require(
        cfg.compile.enabled, key,
        "needs compile.enabled = true (uncompiled, torchao's float8 casts run as many small kernels and the step is slower than bf16)",
    )
    _require(
        cfg.training.mixed_precision != "fp32", key,
        "needs bf16 compute; set training.mixed_precision to auto or bf16",
    )
    _require(importlib.util.find_spec("torchao") is not None, key, f"needs torchao, which is not installed: {FLOAT8_INSTALL_HINT}")
    _require(
        cfg.training.float8_recipe != "tensorwise" or cfg.parallelism.tp <= 1, "training.float8_recipe",
        "'tensorwise' with tensor parallelism (parallelism.tp > 1) is not supported here (its scales would need "
        "float8-aware TP styles); use 'rowwise' or tp = 1",
    )


def _validate_cudagraphs(cfg: "JobConfig") -> None:
    if not cfg.compile.cudagraphs:
        return
    key = "compile.cudagraphs"
    _require(cfg.compile.enabled, key, "replays compiled blocks; set compile.enabled = true as well")
    _require(cfg.model.backend == "native", key, "works with model.backend = 'native' only; set it to false")
    _require(
        cfg.job.recipe in ("sft", "grpo"), key,
        f"works with the sft and grpo recipes only (one forward of a compiled model per backward; job.recipe = "
        f"{cfg.job.recipe!r} runs a reference or teacher forward next to it); set it to false",
    )
    _require(
        cfg.activation_checkpoint.mode == "none", key,
        "cannot be combined with activation checkpointing (a recomputed block would replay its graph inside the "
        "backward); set activation_checkpoint.mode = 'none' or compile.cudagraphs = false",
    )
    _require(
        cfg.activation_checkpoint.offload_blocks == 0, key,
        "cannot be combined with activation_checkpoint.offload_blocks (saved tensors live in the graphs' private "
        "pool, which a later replay may overwrite while a host copy still reads it); set one of them off",
    )


def validate_world_size(cfg: "JobConfig", world_size: int) -> None:
    """The parallel degrees multiply to `world_size`, and the global batch splits over data-parallel
    ranks and micro-batches."""
    p, t = cfg.parallelism, cfg.training
    fixed = p.dp_replicate * p.tp
    if p.dp_shard == -1:
        _require(
            world_size % fixed == 0,
            "parallelism.tp",
            f"* parallelism.dp_replicate = {fixed} does not divide the world size {world_size}",
        )
        dp_shard = world_size // fixed
    else:
        dp_shard = p.dp_shard
        _require(
            fixed * dp_shard == world_size,
            "parallelism.dp_shard",
            f"* dp_replicate * tp = {dp_shard} * {p.dp_replicate} * {p.tp} = {fixed * dp_shard}, "
            f"but the world size is {world_size} (dp_shard = -1 takes the rest)",
        )
    dp = p.dp_replicate * dp_shard
    _require(
        not cfg.compile.cudagraphs or world_size == 1, "compile.cudagraphs",
        f"works on one device only (FSDP and TP move the weights between steps); the world size is {world_size}",
    )
    _require(
        t.batch_size % dp == 0,
        "training.batch_size",
        f"({t.batch_size}) must be divisible by the data-parallel degree {dp} (dp_replicate * dp_shard)",
    )
    per_rank = t.batch_size // dp
    if t.micro_batch_size > 0:
        _require(
            per_rank % t.micro_batch_size == 0,
            "training.micro_batch_size",
            f"({t.micro_batch_size}) must divide the per-rank batch {per_rank} "
            f"(training.batch_size {t.batch_size} / data-parallel degree {dp})",
        )
