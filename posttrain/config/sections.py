"""One dataclass per component. Each component is handed only its own section.

A field's `help` metadata is its one-line meaning for `train.py --help`; `choices` restricts a string field.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def opt(default, help: str, choices: tuple | None = None, **kw):
    """A config field with its one-line meaning (and allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class JobSection:
    output_dir: str = opt("outputs/debug", "folder for checkpoints, metrics.jsonl, tb/ and hf/")
    seed: int = opt(0, "seed for model init, data order and dropout")
    recipe: str = opt("sft", "which recipe train.py runs", choices=("sft", "dpo", "reward_model", "distill"))
    description: str = opt("", "free text, written to the run's config.json")


@dataclass
class ModelSection:
    name: str = opt("qwen3", "model family (llama3, qwen3, ...); ignored when hf_path is set")
    flavor: str = opt("debug", "named size of the family (debug, 0.6B, 1.7B, 8B, ...)")
    hf_path: str = opt("", "HF checkpoint folder or hub id to initialize from (decides family and sizes)")
    attn_backend: str = opt("auto", "attention kernel: flex on GPU, sdpa on CPU", choices=("auto", "flex", "sdpa"))
    dtype: str = opt("auto", "parameter dtype: bf16 on GPU, fp32 on CPU", choices=("auto", "float32", "bfloat16"))


@dataclass
class TokenizerSection:
    path: str = opt("", "tokenizer folder or hub id (default: model.hf_path)")
    pad_token: str = opt("", "pad token to use when the tokenizer has none")
    add_special_tokens: list[str] = opt([], "extra special tokens (e.g. semantic IDs) added to the vocabulary")


@dataclass
class DataSection:
    path: str = opt("", "one dataset: a file, a glob, a URL (s3://, gs://, https://) or a save_to_disk folder")
    paths: list[str] = opt([], "several datasets to mix (instead of path)")
    weights: list[float] = opt([], "mixing weights for paths (default: equal)")
    format: str = opt(
        "auto",
        "row format (auto detects messages / conversations / prompt+completion / text)",
        choices=("auto", "chat", "sharegpt", "prompt_completion", "text"),
    )
    packing: str = opt("best_fit", "how samples fill seq_len rows", choices=("best_fit", "padding"))
    pack_buffer: int = opt(64, "samples held by the best-fit packer to choose from")
    overlong: str = opt("truncate", "samples longer than seq_len are truncated or dropped", choices=("truncate", "drop"))
    shuffle_buffer: int = opt(1000, "rows held in the streaming shuffle buffer (0 = no shuffle)")
    num_workers: int = opt(1, "background data workers per rank (0 = pack in the training process)")
    prefetch: int = opt(4, "batches prepared ahead per worker")
    skip_bad_rows: bool = opt(False, "skip (and count) malformed rows instead of stopping")
    eval_path: str = opt("", "held-out data for validation loss (optional)")


@dataclass
class TrainingSection:
    steps: int = opt(100, "optimizer steps to run")
    seq_len: int = opt(512, "tokens per packed row")
    batch_size: int = opt(8, "global batch: rows of seq_len per optimizer step, over all ranks")
    micro_batch_size: int = opt(0, "rows per forward on each rank (0 = batch_size / data-parallel degree)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: str = opt(
        "auto", "bf16 autocast/param policy on GPU, fp32 on CPU", choices=("auto", "bf16", "fp32")
    )
    device: str = opt("auto", "cuda when available, else cpu", choices=("auto", "cuda", "cpu"))
    loss_chunk_size: int = opt(4096, "tokens per chunk of the output projection + cross-entropy")
    deterministic: bool = opt(False, "use deterministic algorithms (slower)")


@dataclass
class OptimizerSection:
    name: str = opt("adamw", "optimizer", choices=("adamw",))
    lr: float = opt(3e-4, "peak learning rate")
    weight_decay: float = opt(0.1, "decoupled weight decay (norms and biases excluded)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    fused: str = opt("auto", "fused AdamW kernel where the device has one", choices=("auto", "true", "false"))


@dataclass
class LRSchedulerSection:
    warmup_steps: int = opt(10, "linear warmup steps")
    decay: str = opt("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = opt(0.1, "final lr as a fraction of the peak")


@dataclass
class ParallelismSection:
    dp_replicate: int = opt(1, "data-parallel replicas (HSDP outer dimension)")
    dp_shard: int = opt(-1, "FSDP shard degree (-1 = the rest of the world size)")
    tp: int = opt(1, "tensor-parallel degree")
    loss_parallel: bool = opt(False, "keep the output projection sharded over TP in the loss")
    fsdp_reshard_after_forward: str = opt(
        "default", "free gathered weights after forward", choices=("default", "always", "never")
    )


@dataclass
class ActivationCheckpointSection:
    mode: str = opt("none", "activation checkpointing", choices=("none", "full", "selective", "op"))
    every_n: int = opt(2, "selective mode: checkpoint every n-th block")


@dataclass
class CompileSection:
    enabled: bool = opt(False, "torch.compile each transformer block")
    loss: bool = opt(False, "torch.compile the loss chunk as well")


@dataclass
class CheckpointSection:
    interval: int = opt(0, "save every N steps (0 = only at the end)")
    keep_last: int = opt(2, "checkpoints kept on disk (0 = all)")
    export_hf: bool = opt(False, "write <output_dir>/hf/ (weights + tokenizer) at the end")
    save_final: bool = opt(True, "save a checkpoint at the last step")
    resume: bool = opt(True, "resume from the latest complete checkpoint in output_dir")


@dataclass
class MetricsSection:
    log_freq: int = opt(1, "log every N steps")
    tensorboard: bool = opt(True, "write TensorBoard events to <output_dir>/tb/")
    peak_tflops: float | None = opt(None, "device peak bf16 TFLOP/s for MFU (default: known GPUs; none on CPU)")


SECTIONS: dict[str, type] = {
    "job": JobSection,
    "model": ModelSection,
    "tokenizer": TokenizerSection,
    "data": DataSection,
    "training": TrainingSection,
    "optimizer": OptimizerSection,
    "lr_scheduler": LRSchedulerSection,
    "parallelism": ParallelismSection,
    "activation_checkpoint": ActivationCheckpointSection,
    "compile": CompileSection,
    "checkpoint": CheckpointSection,
    "metrics": MetricsSection,
}
