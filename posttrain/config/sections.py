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
    recipe: str = opt(
        "sft", "which recipe train.py runs: sft, dpo, reward_model, distill, or your own run(cfg) as 'module:attr'"
    )
    description: str = opt("", "free text, written to the run's config.json")
    collective_timeout_s: float = opt(1800.0, "seconds a collective may wait before the process group reports a hung rank")
    dry_run: bool = opt(False, "print the resolved config, parameter counts, memory estimate and layout, then exit")


@dataclass
class ModelSection:
    name: str = opt("qwen3", "model family (llama3, qwen3, ...); ignored when hf_path is set")
    flavor: str = opt("debug", "named size of the family (debug, 0.6B, 1.7B, 8B, ...)")
    hf_path: str = opt("", "HF checkpoint folder or hub id to initialize from (decides family and sizes)")
    attn_backend: str = opt("auto", "attention kernel: flex on GPU, sdpa on CPU", choices=("auto", "flex", "sdpa"))
    dtype: str = opt("auto", "parameter dtype: bf16 on GPU, fp32 on CPU", choices=("auto", "float32", "bfloat16"))
    vocab_size: int = opt(0, "from scratch: the model's vocabulary size (0 = the flavor's); not with hf_path")
    overrides: dict = opt({}, "from scratch: architecture fields over the flavor, e.g. {dim = 256, n_layers = 4}")
    backend: str = opt(
        "native",
        "native: posttrain's own model code (built-in families); hf: any transformers AutoModelForCausalLM "
        "(model.hf_path) through the same trainer",
        choices=("native", "hf"),
    )
    head: str = opt("lm", "output head: next-token logits, a scalar value/reward, or class logits",
                    choices=("lm", "value", "classification"))
    num_labels: int = opt(2, "outputs of the classification head (head = 'classification')")


@dataclass
class TokenizerSection:
    path: str = opt("", "tokenizer folder or hub id (default: model.hf_path)")
    pad_token: str = opt("", "pad token to use when the tokenizer has none")
    add_special_tokens: list[str] = opt([], "extra special tokens (e.g. semantic IDs) added to the vocabulary")
    add_tokens_file: str = opt("", "a file of tokens to add (one per line, e.g. semantic IDs); grows the model's vocabulary")


@dataclass
class DataSection:
    path: str = opt("", "one dataset: a file, a glob, a URL (s3://, gs://, https://) or a save_to_disk folder")
    paths: list[str] = opt([], "several datasets to mix (instead of path)")
    weights: list[float] = opt([], "mixing weights for paths (default: equal)")
    format: str = opt(
        "auto",
        "row format: auto (detects messages / conversations / prompt+completion / text / input_ids), chat, "
        "sharegpt, prompt_completion, text, tokens (pre-tokenized ids, no tokenizer), or 'module:attr' of your own",
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
    max_consecutive_bad_steps: int = opt(
        5, "a non-finite loss/grad skips the step; this many in a row stop the run (0 = no check, no host sync)"
    )
    loss: str = opt("cross_entropy", "SFT loss: cross_entropy, or your own fn(model, batch, n_global) as 'module:attr'")


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
    defer_grad_sync: bool = opt(
        False, "with gradient accumulation, reduce gradients once after the last micro-batch (less traffic, more memory)"
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
    async_save: bool = opt(False, "write checkpoints in the background (torch.distributed.checkpoint.async_save)")


@dataclass
class LoRASection:
    rank: int = opt(0, "LoRA rank (0 = off: full fine-tuning)")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapters' input")
    targets: list[str] = opt(
        ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        "modules to adapt, by name: wq wk wv wo (attention), w1 w2 w3 (MLP), output (untied LM head)",
    )


@dataclass
class MetricsSection:
    log_freq: int = opt(1, "log every N steps")
    tensorboard: bool = opt(True, "write TensorBoard events to <output_dir>/tb/")
    peak_tflops: float | None = opt(None, "device peak bf16 TFLOP/s for MFU (default: known GPUs; none on CPU)")


@dataclass
class DPOSection:
    loss_type: str = opt(
        "sigmoid",
        "preference loss: sigmoid (DPO; conservative DPO with label_smoothing > 0), ipo, or simpo (reference-free)",
        choices=("sigmoid", "ipo", "simpo"),
    )
    beta: float = opt(0.1, "strength of the KL anchor to the reference (DPO / IPO) or the reward scale (SimPO)")
    label_smoothing: float = opt(0.0, "probability that a pair's labels are flipped (cDPO), in [0, 0.5)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin")
    reference: str = opt(
        "model", "reference log-probs: a frozen copy of the starting model, or none (log-prob 0)", choices=("model", "none")
    )
    precompute_reference: bool = opt(False, "score every pair with the reference once before training, then free it")


@dataclass
class DistillSection:
    teacher_hf_path: str = opt("", "the teacher's HF folder or hub id (decides its family and sizes)")
    teacher_name: str = opt("", "teacher model family when no teacher_hf_path (default: model.name)")
    teacher_flavor: str = opt("", "teacher flavor when no teacher_hf_path (default: model.flavor)")
    kind: str = opt(
        "forward_kl", "divergence to the teacher over the vocabulary", choices=("forward_kl", "reverse_kl", "jsd")
    )
    temperature: float = opt(1.0, "softmax temperature of both models in the divergence (scaled back by T^2)")
    ce_weight: float = opt(0.0, "loss = ce_weight * cross-entropy + (1 - ce_weight) * divergence")
    jsd_beta: float = opt(0.5, "jsd: teacher weight beta of the mixture M = beta P + (1 - beta) Q, in (0, 1)")


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
    "lora": LoRASection,
    "dpo": DPOSection,
    "distill": DistillSection,
}
