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
        "sft",
        "which recipe train.py runs: sft, dpo, reward_model, distill, grpo, or your own run(cfg) as 'module:attr'",
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
    sdpa_kernel: str = opt(
        "auto",
        "with attn_backend sdpa: which SDPA kernel runs (auto: torch's choice; cudnn, flash, efficient, math pin one; "
        "fa4: the flash entry run by FlashAttention-4, pip install flash-attn-4, Hopper/Blackwell)",
        choices=("auto", "cudnn", "flash", "efficient", "math", "fa4"),
    )
    dtype: str = opt("auto", "parameter dtype: bf16 on GPU, fp32 on CPU", choices=("auto", "float32", "bfloat16"))
    rms_norm_backward: str = opt(
        "autograd",
        "RMSNorm's backward: autograd's (inductor's kernels when compiled), or triton: one pass over the rows with "
        "the forward's rms saved and the residual stream's gradient added (a Triton kernel on CUDA, the same math in "
        "torch ops elsewhere), on the norms over the model width (per-head q / k norms keep autograd's). Compiled, on "
        "one H200, its first version (no residual add) was 0.8 ms slower on a 143 ms Llama-3.2-1B step, and by "
        "inductor's byte counts this one still moves more than inductor's own kernels (which run at the HBM's "
        "speed): autograd stays the default",
        choices=("autograd", "triton"),
    )
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


# The row fields `[data.columns]` may map a dataset's own column names to (see posttrain/datasets/columns.py)
DATA_COLUMN_FIELDS = (
    "messages", "conversations", "prompt", "completion", "text", "system", "instruction", "input", "output",
    "chosen", "rejected",
)


@dataclass
class DataSection:
    path: str = opt("", "one dataset: a file, a glob, a URL (s3://, gs://, https://) or a save_to_disk folder")
    paths: list[str] = opt([], "several datasets to mix (instead of path)")
    weights: list[float] = opt([], "mixing weights for paths (default: equal)")
    format: str = opt(
        "auto",
        "row format: auto (detects messages / conversations / prompt+completion / instruction+output / text / "
        "input_ids), chat, sharegpt, prompt_completion, alpaca, text, tokens (pre-tokenized ids, no tokenizer), or "
        "'module:attr' of your own",
    )
    packing: str = opt("best_fit", "how samples fill seq_len rows", choices=("best_fit", "padding"))
    pack_buffer: int = opt(64, "samples held by the best-fit packer to choose from")
    overlong: str = opt("truncate", "samples longer than seq_len are truncated or dropped", choices=("truncate", "drop"))
    shuffle_buffer: int = opt(1000, "rows held in the streaming shuffle buffer (0 = no shuffle)")
    num_workers: int = opt(1, "background data workers per rank (0 = pack in the training process)")
    prefetch: int = opt(4, "batches prepared ahead per worker")
    skip_bad_rows: bool = opt(False, "skip (and count) malformed rows instead of stopping")
    max_row_bytes: int = opt(
        8 << 20, "a JSON line longer than this many bytes is a bad row, rejected before it is parsed (0 = no limit)"
    )
    eval_path: str = opt("", "held-out data for validation loss (optional)")
    columns: dict = opt(
        {},
        "your dataset's column names for the fields the formats read, e.g. {prompt = \"question\", completion = "
        "\"answer\"}; fields: " + ", ".join(DATA_COLUMN_FIELDS),
    )


FLOAT8_RECIPES = ("rowwise", "tensorwise")  # torchao's recipe names that training.float8_recipe takes


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
    loss_chunk_size: int = opt(
        0, "tokens per chunk of the output projection + loss (0 = auto: ~320 MiB of logits fused, 4096 chunked)"
    )
    loss_impl: str = opt(
        "fused", "head losses: gradients made chunk by chunk in forward (fused) or the older chunked path",
        choices=("fused", "chunked"),
    )
    deterministic: bool = opt(
        False, "bit-identical steps for the same config, data and checkpoint (deterministic kernels; slower)"
    )
    max_consecutive_bad_steps: int = opt(
        5, "a non-finite loss/grad skips the step; this many in a row stop the run (0 = no check, no host sync)"
    )
    loss: str = opt("cross_entropy", "SFT loss: cross_entropy, or your own fn(model, batch, n_global) as 'module:attr'")
    sparse_embedding_grad: bool = opt(
        False, "on one CUDA device, a tied embedding's lookup gradient as the looked-up rows (each id's summed as the "
        "dense backward sums them), added to the head's dense gradient once per id (no zero-filled [vocab, dim] "
        "buffer); not in deterministic mode. Equal to the dense gradient on the H200, and no faster there (Llama-3.2-1B "
        "step 142.7 vs 142.6 ms): off by default"
    )
    float8: bool = opt(
        False, "float8 matmuls (torchao; scaling: training.float8_recipe) in the transformer blocks' Linear layers; "
        "needs torchao, compile.enabled and a GPU of compute capability >= 8.9"
    )
    float8_convert_small_gemms: bool = opt(
        False, "float8: also convert Linear layers torchao measured as too small to gain (skipped by default)"
    )
    float8_recipe: str = opt(
        "rowwise", "float8 scaling: rowwise (a scale per row; torchao's more accurate recipe) or tensorwise (one "
        "scale per tensor: fewer, cheaper casts; not with tensor parallelism)", choices=FLOAT8_RECIPES,
    )


@dataclass
class OptimizerSection:
    name: str = opt("adamw", "optimizer", choices=("adamw",))
    lr: float = opt(3e-4, "peak learning rate")
    weight_decay: float = opt(0.1, "decoupled weight decay (norms and biases excluded)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    fused: str = opt(
        "auto", "AdamW kernel: triton (posttrain's, one launch per parameter group; CUDA), true (torch's fused), "
        "false (torch's foreach); auto = triton on CUDA for unsharded parameters, else torch's fused, foreach on CPU",
        choices=("auto", "triton", "true", "false"),
    )


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
    mode: str = opt("none", "activation checkpointing", choices=("none", "full", "selective", "op", "budget"))
    every_n: int = opt(2, "selective mode: checkpoint every n-th block")
    skip_last: int = opt(
        0,
        "full / selective / op: the last n blocks are not checkpointed (they run backward first, while few "
        "gradients exist, so up to some n this saves their recomputation without raising the step's peak memory)",
    )
    memory_budget: float = opt(
        0.5, "budget mode (needs compile): share of the activation memory kept (0..1); the cheapest ops are recomputed"
    )
    offload_blocks: int = opt(
        0,
        "the first n of the blocks left unwrapped (mode none / budget: blocks 0..n-1; full / op: the earliest of the "
        "last skip_last) keep their saved activations in pinned host memory from forward to backward (CUDA; copies "
        "on a side stream, each block brought back while the two blocks after it run backward): n more unwrapped blocks "
        "at about the same peak, for host-link traffic",
    )


@dataclass
class CompileSection:
    enabled: bool = opt(False, "torch.compile each transformer block")
    loss: bool = opt(False, "torch.compile the loss chunk as well")
    recompute_pointwise: bool = opt(
        True,
        "compiled blocks recompute pointwise results that feed a matmul (norm outputs, the SwiGLU product) in "
        "backward instead of saving them: about 30% less activation memory, no matmul recomputed (not in blocks "
        "checkpointed whole, where it would add work and raise their backward's peak); on a Qwen3-1.7B step on one "
        "H200: peak 21.7 instead of 26.1 GiB for 1% of the step time",
    )
    cudagraphs: bool = opt(
        False,
        "replay the compiled blocks as CUDA graphs (torch.compile's 'reduce-overhead' mode): for steps bound by "
        "kernel launches, such as GRPO's packed passes on a small model; one device, the sft and grpo recipes, no "
        "activation checkpointing, and a training.loss of your own must run the model once per backward; the graphs' "
        "memory pool and the gradients are kept between steps. Ignored on a CPU",
    )


@dataclass
class CheckpointSection:
    interval: int = opt(0, "save every N steps (0 = only at the end)")
    keep_last: int = opt(2, "checkpoints kept on disk (0 = all)")
    export_hf: bool = opt(False, "write <output_dir>/hf/ (weights + tokenizer) at the end")
    save_final: bool = opt(True, "save a checkpoint at the last step")
    resume: bool = opt(True, "resume from the latest complete checkpoint in output_dir")
    overwrite: bool = opt(
        False, "with resume = false: delete an earlier run's checkpoints and metrics.jsonl in output_dir (else refused)"
    )
    async_save: bool = opt(False, "write checkpoints in the background (torch.distributed.checkpoint.async_save)")


@dataclass
class LoRASection:
    rank: int = opt(0, "LoRA rank (0 = off: full fine-tuning)")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapters' input")
    targets: list[str] = opt(
        ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        "modules to adapt, by name: wq wk wv wo (attention), w1 w2 w3 (MLP), output (untied LM head), "
        "experts (the stacked MoE experts of qwen3_moe / gpt_oss)",
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


@dataclass
class GRPOSection:
    """GRPO (job.recipe = "grpo", posttrain/rl/): the policy is model.* / lora.* / optimizer.* / parallelism.*."""

    prompts: str = opt("", "training prompts: a jsonl file or glob (rows with messages or prompt, plus answer), "
                           "or reasoning_gym:<task>[,<task>]")
    eval_prompts: str = opt("", "held-out prompts scored greedily every eval_freq steps (same forms as prompts)")
    eval_size: int = opt(64, "held-out prompts per evaluation")
    system_prompt: str = opt("", "a system message put before every prompt (empty: none)")
    instruction: str = opt("", "text appended to every user prompt, e.g. 'Put the final answer in \\boxed{}.'")
    group_size: int = opt(8, "completions sampled per prompt (G)")
    prompts_per_step: int = opt(8, "prompts per GRPO step; a step trains on prompts_per_step x group_size completions")
    max_new_tokens: int = opt(256, "longest completion; longer ones are cut (finish_reason 'length')")
    temperature: float = opt(1.0, "sampling temperature (log-probs of the policy are taken at the same temperature)")
    top_p: float = opt(1.0, "nucleus sampling (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    rewards: list[str] = opt(["math_answer"], "reward functions: built-in names (math_answer, format, reasoning_gym) "
                                              "or 'module:function'")
    reward_weights: list[float] = opt([], "one weight per reward (default: 1 each)")
    advantage: str = opt("std", "group advantages: (r - mean) / (std + eps), or mean-only (Dr. GRPO)",
                         choices=("std", "none"))
    loss_agg: str = opt("token_mean", "policy-loss average over tokens, or per sequence then over sequences",
                        choices=("token_mean", "sequence_mean"))
    clip_low: float = opt(0.2, "importance ratio clipped below at 1 - clip_low")
    clip_high: float = opt(0.28, "importance ratio clipped above at 1 + clip_high (DAPO clip-higher)")
    kl_coef: float = opt(0.0, "weight of the k3 KL to the reference model (0 = no reference model at all)")
    kl_mode: str = opt("loss", "the KL penalty as a loss term or subtracted from the reward", choices=("loss", "reward"))
    micro_batch_tokens: int = opt(0, "> 0: the log-prob passes and the update pack completions into rows of this "
                                     "many positions, one row per forward (document masks, no padding to the "
                                     "longest, one shape every step); 0: training.micro_batch_size padded rows")
    share_prompts: bool = opt(False, "with micro_batch_tokens: the completions of one prompt follow one copy of it "
                                     "in a packed row and attend to it (the prompt's positions computed once per "
                                     "group, not once per completion)")
    epochs: int = opt(1, "passes over each rollout batch")
    minibatches: int = opt(1, "optimizer steps per epoch (the rollout batch split in this many minibatches)")
    filter_zero_variance: bool = opt(True, "drop groups whose completions all got the same reward (no signal)")
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty over the last N tokens before max_new_tokens (0 = off)")
    overlong_penalty: float = opt(1.0, "the overlong penalty at max_new_tokens (reaches it linearly over the buffer)")
    old_logprobs: str = opt("recompute", "old log-probs: recomputed by the trainer, or the engine's with truncated "
                                         "importance sampling", choices=("recompute", "engine"))
    tis_cap: float = opt(2.0, "truncated importance-sampling cap for old_logprobs = 'engine'")
    engine: str = opt("native", "rollout engine: posttrain's own KV-cache engine or vLLM", choices=("native", "vllm"))
    engine_dtype: str = opt("auto", "rollout engine dtype: bf16 on GPU, fp32 on CPU",
                            choices=("auto", "float32", "bfloat16"))
    engine_max_batch_size: int = opt(64, "native engine: sequences decoded together (at most: fewer when their KV "
                                         "cache would not fit grpo.gpu_memory_utilization)")
    engine_compile: bool = opt(False, "native engine: compile its blocks for the decode steps (fused kernels in the "
                                      "CUDA graphs; one compile per decode bucket at the first rollout)")
    gpu_memory_utilization: float = opt(0.3, "rollout engine: share of device memory its process may hold, weights + "
                                             "KV cache (vLLM: of RAM on CPU; native: no cap on CPU)")
    rollout_workers: int = opt(1, "rollout engine actors; each generates a share of the prompts")
    trainer_workers: int = opt(1, "policy actors: one torch.distributed group (FSDP / TP from parallelism.*)")
    placement: str = opt("colocated", "colocated: rollout engines share the policy's devices (time-shared); "
                                      "split: separate devices", choices=("colocated", "split"))
    ray_address: str = opt("", "Ray cluster to join (e.g. 'auto' or 'ray://host:10001'); empty: start a local one")
    ray_num_cpus: int = opt(0, "local cluster only: CPUs Ray may use (0 = all of this machine)")
    cpu_threads: int = opt(0, "torch threads per actor on CPU (0 = the machine's cores)")
    weight_sync_bucket_mb: int = opt(256, "weight sync: tensors sent per bucket (MB)")
    weight_sync: str = opt("object_store", "weight sync transport: the Ray object store (through host memory); "
                                           "CUDA IPC handles (colocated on CUDA: the engine copies from the "
                                           "policy's device memory); or collective: a weight-update group of "
                                           "policy rank 0 and the engines (NCCL on CUDA, split placement; gloo "
                                           "on CPU) broadcasting each bucket",
                           choices=("object_store", "cuda_ipc", "collective"))
    weight_sync_timeout_s: float = opt(600.0, "weight_sync = 'collective': seconds a rendezvous or a bucket's "
                                              "broadcast may take before the group fails (a dead peer)")
    eval_freq: int = opt(0, "evaluate on eval_prompts every N steps, before training and at the end (0 = never)")
    time_budget_s: float = opt(0.0, "wall-clock budget of the run from its start (0 = none): no step starts that "
                                    "would end past it (judged by the slowest of the last steps); the last step "
                                    "run then gets the final eval, checkpoint and export as training.steps would")
    log_samples: int = opt(2, "completions per step written to TensorBoard text and <output_dir>/samples.jsonl")


@dataclass
class EvaluationSection:
    freq: int = opt(0, "validation loss (eval_loss) on data.eval_path every N steps (0 = only at the end)")
    max_batches: int = opt(0, "micro-batches per rank in one validation pass (0 = all of data.eval_path)")
    generation_path: str = opt(
        "", "jsonl of prompts with answers (messages / prompt / question + answer) for eval_accuracy (empty = off)"
    )
    generation_freq: int = opt(0, "generation eval every N steps (0 = only at the end)")
    max_new_tokens: int = opt(128, "tokens generated greedily per prompt in the generation eval")
    max_prompts: int = opt(0, "prompts scored in one generation eval (0 = all of generation_path)")


@dataclass
class ProfilingSection:
    enable: bool = opt(False, "capture a torch.profiler chrome trace per rank of the chosen steps")
    steps: list[int] = opt([], "steps to profile, e.g. [5, 6] (empty: count steps from start_step)")
    start_step: int = opt(3, "first profiled step when steps is empty")
    count: int = opt(1, "steps profiled from start_step when steps is empty")
    trace_dir: str = opt("", "where traces go (default: <output_dir>/profile)")
    memory_snapshot: bool = opt(False, "CUDA only: record the allocator over the chosen steps and dump a snapshot")


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
    "grpo": GRPOSection,
    "evaluation": EvaluationSection,
    "profiling": ProfilingSection,
}
