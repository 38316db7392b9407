"""The shared training core: build model / optimizer / scheduler, step with gradient accumulation, clip, log,
checkpoint, resume and export. Recipes (SFT, DPO, distillation) hand it a data loader and a loss function.

One optimizer step, for a global batch of `training.batch_size` rows:
  1. draw `grad_accum` micro-batches from this rank's loader (time spent waiting is logged),
  2. count the target tokens of the whole global batch (all micro-batches, all data-parallel ranks),
  3. forward + backward each micro-batch with loss = sum of token losses / global target tokens,
     so the gradient is the token-weighted mean over the global batch, however it is split,
  4. clip, optimizer step, lr step, log, checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from posttrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from posttrain.checkpoint.fingerprint import run_fingerprint
from posttrain.checkpoint.resume_check import ResumeFingerprintCheck
from posttrain.checkpoint.run_lock import claim_output_dir
from posttrain.config import JobConfig, config_to_dict, validate_world_size
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.deterministic import use_deterministic_mode
from posttrain.divergence import DivergenceGuard
from posttrain.metrics import (
    MetricsLogger,
    attention_flops,
    dense_flops_per_token,
    document_lengths_from_ids,
    mfu_percent,
    peak_memory_gib,
    reset_peak_memory,
)
from posttrain.finetune_setup import add_config_modules, count_config_tokens, init_config_modules, read_tokens_file
from posttrain.models import protocol as model_hooks
from posttrain.models.common.flash_attention_4 import FlashAttention4Unavailable, activate_fa4
from posttrain.models.common.rms_norm import use_one_pass_backward
from posttrain.models.hf import read_hf_config, resolve_hf_folder, spec_for_hf_config
from posttrain.models.serving_files import read_generation_config
from posttrain.models.vocab_growth import grown_vocab_size
from posttrain.models.registry import get_model_spec, resolve_args, resolve_scratch_args
from posttrain.models.sharded_load import init_weights_sharded, load_hf_weights_sharded
from posttrain.optim import apply_optimizer_config, build_lr_scheduler, build_optimizer, total_grad_norm
from posttrain.parallelisms import (
    ParallelDims,
    clip_divisor,
    clip_grad_norm_,
    get_parallelize_fn,
)
from posttrain.parallelisms.activation_offload import activation_offloader
from posttrain.parallelisms.compile import partitioner_settings_kept
from posttrain.parallelisms.distributed import destroy_distributed, init_distributed
from posttrain.parallelisms.float8 import Float8Unavailable, apply_float8_training
from posttrain.parallelisms.sparse_embedding_grad import use_sparse_embedding_grad
from posttrain.preemption import PreemptionFlag
from posttrain.profiling import StepProfiler

logger = logging.getLogger("posttrain")


@dataclass
class LossOutput:
    """What a recipe's loss function returns for one micro-batch."""

    loss_sum: torch.Tensor  # sum over target tokens (or pairs), fp32, differentiable
    n_targets: torch.Tensor  # how many targets the sum covers (already known before forward)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums, reduced and divided by n_targets


LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], LossOutput]


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets of a micro-batch: its own `n_targets` entry when it has one (e.g. preference pairs, the unit a
    DPO loss is averaged over), else the positions whose label is not -100."""
    if "n_targets" in batch:
        return torch.as_tensor(batch["n_targets"])
    return (batch["labels"] != -100).sum()


def own_gradients(params: Iterable[torch.nn.Parameter], owned: WeakIdKeyDictionary) -> None:
    """compile.cudagraphs: a replayed backward's outputs live in the CUDA graphs' memory pool, which the next
    forward (a new graph step) takes back, and autograd keeps a parameter's first gradient as that output
    itself. So each gradient, the first time it appears, becomes a copy of its own (``owned`` remembers it, keyed
    by the parameter's identity: tensors cannot be compared as dictionary keys); it is then zeroed in place after
    every step (never set to None), and later backwards add into it. A parameter the loss never reaches keeps no
    gradient, as without graphs (the optimizer skips it)."""
    for p in params:
        if p.grad is not None and owned.get(p) is not p.grad:
            p.grad = p.grad.clone()
            owned[p] = p.grad


def build_training_model(
    cfg: JobConfig,
    *,
    parallel_dims: ParallelDims,
    device: torch.device,
    mixed_precision: str,
    tokenizer_vocab_size: int,
    added_tokens: int | None = None,
    frozen: bool = False,
) -> nn.Module:
    """Build on the meta device, parallelize (TP -> AC -> compile -> FSDP), materialize, then load or init.

    With `model.hf_path`, its config.json decides the family and sizes; each rank reads only its own shards.
    `added_tokens` (added to the tokenizer by config; None: counted from the config's token lists) may grow
    the vocabulary; the head and LoRA adapters of
    the config are attached before parallelizing (see `posttrain/finetune_setup.py`). `frozen`: a model that is
    never trained (a reference, a teacher) leaves the process-wide partitioner settings as the trained model set them.
    """
    if frozen:
        with partitioner_settings_kept():
            return build_training_model(cfg, parallel_dims=parallel_dims, device=device, mixed_precision=mixed_precision,
                                        tokenizer_vocab_size=tokenizer_vocab_size, added_tokens=added_tokens)
    m = cfg.model
    if m.backend == "hf" and m.sdpa_kernel != "auto":
        raise SystemExit(f"model.sdpa_kernel = {m.sdpa_kernel!r} applies to posttrain's own models: with "
                         "model.backend = 'hf' transformers picks the attention kernel (leave it 'auto')")
    if m.backend == "hf":  # any transformers causal LM, wrapped (posttrain/parallelisms/hf_parallelize.py)
        from posttrain.parallelisms.hf_parallelize import build_parallel_hf_model

        return build_parallel_hf_model(
            m, parallel_dims=parallel_dims, device=device, mixed_precision=mixed_precision,
            ac=cfg.activation_checkpoint, compile=cfg.compile, parallelism=cfg.parallelism, seed=cfg.job.seed,
            packing=cfg.data.packing, tokenizer_vocab_size=tokenizer_vocab_size, lora_rank=cfg.lora.rank,
        )
    if m.hf_path:
        folder = resolve_hf_folder(m.hf_path)
        hf_config = read_hf_config(folder)
        try:
            spec = spec_for_hf_config(hf_config)
        except ValueError as err:
            raise SystemExit(f"model.hf_path = {m.hf_path}: {err}") from err
        if m.name not in (spec.name, *spec.hf_model_types):
            logger.warning("model.name %r ignored: %s/config.json says %r", m.name, folder, spec.name)
        args = resolve_args(spec, spec.args_from_hf_config(hf_config))
    else:
        folder = None
        try:
            spec = get_model_spec(m.name)
            args = resolve_scratch_args(spec, m.flavor, vocab_size=m.vocab_size, overrides=m.overrides)
        except (KeyError, TypeError, ValueError) as err:
            raise SystemExit(f"model.name / model.flavor / model.vocab_size / model.overrides: {err.args[0]}") from err
    backend = m.attn_backend
    if backend == "auto":
        backend = "flex" if device.type == "cuda" else "sdpa"
    if m.sdpa_kernel == "fa4":
        if backend != "sdpa":
            raise SystemExit(f"model.sdpa_kernel = 'fa4' needs model.attn_backend = 'sdpa' (it is {backend!r})")
        try:
            activate_fa4()
        except FlashAttention4Unavailable as err:
            raise SystemExit(f"model.sdpa_kernel = 'fa4': {err}") from err
    if backend == "flex" and cfg.compile.enabled and cfg.activation_checkpoint.mode == "op":
        # Dynamo-traced checkpointing around FlexAttention gave wrong gradients (or an inductor error) on an H200
        # with torch 2.11 (benchmarks/results/2026-12-03_h200_diagnose_compile_flex_ac.txt); full/selective are exact.
        raise SystemExit("activation_checkpoint.mode = 'op' with compile and FlexAttention gives wrong gradients "
                         "(torch 2.11); use mode 'full' or 'selective', or model.attn_backend = 'sdpa'")
    if backend == "flex" and device.type == "cpu":
        raise SystemExit("model.attn_backend = 'flex' has no backward on CPU; use 'sdpa' (or 'auto')")
    args.attn_backend = backend
    args.sdpa_kernel = m.sdpa_kernel
    if added_tokens is None:
        added_tokens = count_config_tokens(cfg.tokenizer)
    try:
        grown = grown_vocab_size(args.vocab_size, tokenizer_vocab_size, added_tokens)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    old_vocab = args.vocab_size
    if grown is not None:
        logger.info("vocabulary grown %d -> %d for tokens added by config", old_vocab, grown)
        args.vocab_size = grown
    with torch.device("meta"):
        model = spec.model_cls(args)
    if m.rms_norm_backward == "triton":
        use_one_pass_backward(model)
    add_config_modules(model, cfg, tp_enabled=parallel_dims.tp_enabled)
    if cfg.training.float8:  # before parallelizing, like torchtitan's model converters
        try:
            apply_float8_training(model, device=device, convert_small_gemms=cfg.training.float8_convert_small_gemms,
                                  recipe=cfg.training.float8_recipe)
        except Float8Unavailable as err:
            raise SystemExit(f"training.float8 = true: {err}") from err
    try:
        get_parallelize_fn(spec.name)(
            model,
            parallel_dims,
            mixed_precision=mixed_precision,
            ac=cfg.activation_checkpoint,
            compile=cfg.compile,
            parallelism=cfg.parallelism,
        )
    except (ValueError, NotImplementedError) as err:  # a TP degree, plan or loss_parallel the model cannot take
        raise SystemExit(f"model {spec.name}: {err}") from err
    if m.dtype == "bfloat16":
        model.to(dtype=torch.bfloat16)
    model.to_empty(device=device)
    if folder is not None:
        load_hf_weights_sharded(model, folder, spec, checkpoint_vocab_size=old_vocab if grown else None)
        model.hf_generation_config = read_generation_config(folder)  # carried into the HF export
    else:
        init_weights_sharded(model, seed=cfg.job.seed, buffer_device=device)
    init_config_modules(model, cfg, hf_folder=folder, spec=spec, grown_from_vocab=old_vocab if grown else None)
    if cfg.training.sparse_embedding_grad and device.type == "cuda" and not cfg.training.deterministic:
        use_sparse_embedding_grad(model)  # after the heads and LoRA are in place: only a trained tied head qualifies
    return model


class Trainer:
    """The training core. Public surface for recipes and RL (nothing else of it is for use from outside):

    - ``set_data_loader(loader)``: the source of ``train_step``'s micro-batches (its state is checkpointed),
    - ``train_step(loss_fn)``: one optimizer step over ``grad_accum`` micro-batches drawn from the loader;
      ``train_step_on(micro_batches, loss_fn)``: the same step over micro-batches the caller gives,
    - ``fit(loss_fn)``: steps until ``training.steps`` with logging, checkpoints, hooks and preemption,
    - ``to_device(batch)``: a CPU batch on the training device (as the step moves it),
    - ``global_sum(values)``: host numbers summed over the data-parallel ranks,
    - ``rank_layout()`` / ``checkpoint_source_rank(metadata)``: the data-parallel rank layout saved with a
      checkpoint, and which saved rank's per-rank state this rank continues,
    - ``checkpoint_state()``, ``load_checkpoint(state)``, ``run_fingerprint()``, ``resume()``,
      ``save_checkpoint()``, ``export_hf()``, ``close()``,
    - attributes ``model``, ``optimizer``, ``tokenizer``, ``device``, ``parallel_dims``, ``dp_rank``,
      ``dp_degree``, ``step``, ``step_hooks``, ``checkpoint``, ``cfg``.

    ``write_metrics=False``: this trainer writes no metrics.jsonl / TensorBoard (another process, e.g. the
    GRPO controller, logs the run).
    """

    def __init__(self, cfg: JobConfig, *, tokenizer: HFTokenizer | None = None, write_metrics: bool = True):
        self.cfg = cfg
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if cfg.training.deterministic:  # before any CUDA work (cuBLAS reads its workspace setting once)
            use_deterministic_mode()
        self.dist = init_distributed(cfg.training.device, timeout_s=cfg.job.collective_timeout_s)
        self.device = self.dist.device
        validate_world_size(cfg, self.dist.world_size)
        self.output_dir = Path(cfg.job.output_dir)
        # One run per output folder; an earlier run's checkpoints are never silently pruned (checkpoint.resume)
        self.run_lock = claim_output_dir(self.output_dir, cfg.checkpoint, is_main=self.dist.is_main)
        self.checkpoint = CheckpointManager(cfg.checkpoint, self.output_dir)

        p = cfg.parallelism
        self.parallel_dims = ParallelDims.from_config(p, self.dist.world_size)
        self.parallel_dims.build_mesh(self.device.type)
        self.dp_rank, self.dp_degree = self.parallel_dims.dp_rank, self.parallel_dims.dp_degree

        t = cfg.training
        self.micro_batch_size = t.micro_batch_size or max(1, t.batch_size // self.dp_degree)
        rows_per_micro_step = self.micro_batch_size * self.dp_degree
        if t.batch_size % rows_per_micro_step:
            raise SystemExit(
                f"training.batch_size = {t.batch_size} is not a multiple of training.micro_batch_size "
                f"({self.micro_batch_size}) x data-parallel degree ({self.dp_degree}); change one of them"
            )
        self.grad_accum = t.batch_size // rows_per_micro_step
        self.mixed_precision = t.mixed_precision
        if self.mixed_precision == "auto":
            self.mixed_precision = "bf16" if self.device.type == "cuda" else "fp32"

        torch.manual_seed(cfg.job.seed)
        self._config_added_tokens: int | None = None  # added to the tokenizer by config (may grow the vocabulary)
        self.tokenizer = tokenizer if tokenizer is not None else self._build_tokenizer()  # None: token-id data
        self.model = build_training_model(
            cfg,
            parallel_dims=self.parallel_dims,
            device=self.device,
            mixed_precision=self.mixed_precision,
            tokenizer_vocab_size=self.tokenizer.vocab_size if self.tokenizer is not None else 0,
            added_tokens=self._config_added_tokens,
        )
        self.model_args = self.model.args
        self._offloader = activation_offloader(self.model)
        if self._offloader is not None and self.device.type != "cuda":
            logger.warning("activation_checkpoint.offload_blocks = %d on %s: the host copies share the device's "
                           "memory, so nothing is saved", cfg.activation_checkpoint.offload_blocks, self.device.type)
        # only once the tokenizer and model are built: a run refused before writes no config.json
        if not (cfg.checkpoint.resume and self.checkpoint.step_folders()):
            self._write_run_config()  # else once the resume is accepted (load_checkpoint)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.metrics = MetricsLogger(cfg.metrics, self.output_dir, rank=self.dist.rank if write_metrics else -1,
                                     total_steps=t.steps)
        self.peak_flops = self.metrics.peak_flops(self.device)
        mfu_unavailable = model_hooks.mfu_unavailable_reason(self.model, t.seq_len)  # the hf backend's models
        if mfu_unavailable:
            if self.dist.is_main:
                logger.info("MFU is not reported (mfu = null): %s", mfu_unavailable)
            self.peak_flops = None
        self.divergence = DivergenceGuard(t.max_consecutive_bad_steps)
        self.preemption = PreemptionFlag()
        self.preempted = False  # set when a preemption signal ended fit() early (after a checkpoint)
        self.abnormal_end: str | None = None  # why the run ended abnormally (close() then exits non-zero)
        self.profiler = StepProfiler(cfg.profiling, self.output_dir, rank=self.dist.rank, device=self.device)
        # Called with no arguments after every optimizer step (e.g. periodic evaluation; see posttrain/evaluation)
        self.step_hooks: list[Callable[[], None]] = []
        self._checkpoint_stall_s: float | None = None  # of the last save, logged with the next metrics
        self._last_saved_step: int | None = None
        self.step = 0
        self.data_loader = None
        self._data_iter: Iterator | None = None
        # FSDP's MixedPrecisionPolicy casts fp32 master weights itself; bf16 parameters need no cast at all.
        self._use_autocast = (
            self.device.type == "cuda"
            and self.mixed_precision == "bf16"
            and not self.parallel_dims.fsdp_enabled
            and cfg.model.dtype != "bfloat16"
        )

    # ---------------------------------------------------------------- building
    def _build_tokenizer(self) -> HFTokenizer | None:
        """The configured tokenizer; None for pre-tokenized data (data.format = tokens or a user format)
        when none is configured: the vocabulary is then the model's (model.vocab_size)."""
        path = self.cfg.tokenizer.path or self.cfg.model.hf_path
        if not path and (self.cfg.data.format == "tokens" or ":" in self.cfg.data.format):
            return None
        if not path:
            raise SystemExit(
                "no tokenizer: set tokenizer.path (or model.hf_path, whose folder holds one), or use "
                "data.format = 'tokens' for pre-tokenized rows"
            )
        tok = HFTokenizer(path, pad_token=self.cfg.tokenizer.pad_token or None)
        self._config_added_tokens = 0
        if self.cfg.tokenizer.add_special_tokens:
            self._config_added_tokens += tok.add_special_tokens(list(self.cfg.tokenizer.add_special_tokens))
        if self.cfg.tokenizer.add_tokens_file:
            self._config_added_tokens += tok.add_special_tokens(read_tokens_file(self.cfg.tokenizer.add_tokens_file))
        return tok

    # ---------------------------------------------------------------- state
    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model_optimizer": ModelOptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "rng": RNGState(),
        }
        if self.data_loader is not None:
            state["dataloader"] = self.data_loader
        return state

    def _write_run_config(self) -> None:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))

    def run_fingerprint(self) -> dict[str, Any]:
        """What checkpoint.json records about this run, checked at resume (posttrain/checkpoint/fingerprint.py)."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = run_fingerprint(
                self.cfg, model_args=self.model_args, dp_degree=self.dp_degree, tokenizer=self.tokenizer
            )
        return self._fingerprint

    def load_checkpoint(self, state: dict[str, Any]) -> int | None:
        """Load the newest loadable checkpoint into `state` (see `checkpoint_state`): refused when the model,
        vocabulary, recipe or data-parallel degree changed; a new lr / schedule / steps / data applies from the
        resumed step. Returns its step, or None (no checkpoint)."""
        check = ResumeFingerprintCheck(self.checkpoint.folder, self.run_fingerprint(), log=self.dist.is_main)
        step = self.checkpoint.load(state, source_rank=self.checkpoint_source_rank, before_load=check)
        if step is not None:
            apply_optimizer_config(self.optimizer, self.lr_scheduler, self.cfg.optimizer)
            self._write_run_config()
        return step

    def resume(self) -> None:
        """Resume from the latest loadable checkpoint of output_dir, if any (and if checkpoint.resume)."""
        if not self.cfg.checkpoint.resume:
            return
        step = self.load_checkpoint(self.checkpoint_state())
        if step is None:
            return
        self.step = step
        self._last_saved_step = step  # a preemption right after resuming need not save this step again
        self._data_iter = None
        self.metrics.truncate_after(step)
        logger.info("resumed from %s at step %d", self.checkpoint.step_dir(step), step)

    def rank_layout(self) -> dict[str, Any]:
        """Which data-parallel rank each global rank is: per-rank state (data position, RNG) follows it."""
        dp_rank_of_rank = [self.dp_rank]
        if self.dist.world_size > 1:
            dp_rank_of_rank = [None] * self.dist.world_size
            dist.all_gather_object(dp_rank_of_rank, self.dp_rank)
        return {"dp_degree": self.dp_degree, "dp_rank_of_rank": dp_rank_of_rank}

    def checkpoint_source_rank(self, metadata: dict[str, Any]) -> int:
        """The saved rank whose data-loader / RNG state this rank continues (the layout may have changed)."""
        layout = metadata.get("layout")
        if layout is None:
            if metadata["world_size"] != self.dist.world_size:
                raise SystemExit("the checkpoint holds no rank layout and the world size changed; resume as it was saved")
            return self.dist.rank
        if layout["dp_degree"] != self.dp_degree:
            raise SystemExit(
                f"the checkpoint in {self.checkpoint.folder} was written with a data-parallel degree of "
                f"{layout['dp_degree']}, this run has {self.dp_degree}: the data stream was split {layout['dp_degree']} "
                "ways and cannot be re-split exactly. Resume with the same dp_replicate x dp_shard (tp may change), "
                "or start a new output_dir from an HF export (checkpoint.export_hf, then model.hf_path)."
            )
        return layout["dp_rank_of_rank"].index(self.dp_rank)

    # ---------------------------------------------------------------- training
    def set_data_loader(self, loader: Any) -> None:
        """Where ``train_step`` draws micro-batches from (an iterable; with ``state_dict`` /
        ``load_state_dict`` its position is checkpointed and resumed)."""
        self.data_loader = loader
        self._data_iter = None

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        return next(self._data_iter)

    def _all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        dp_mesh = self.parallel_dims.dp_mesh
        if dp_mesh is not None:  # ranks of one TP group hold the same rows: reduce over data-parallel ranks only
            dist.all_reduce(value, group=dp_mesh.get_group())
        return value

    def global_sum(self, values: list[float]) -> list[float]:
        """Sum host-side numbers over data-parallel ranks (no device sync at world size 1)."""
        if self.parallel_dims.dp_mesh is None:
            return values
        return self._all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def forward_precision(self) -> AbstractContextManager[Any]:
        """The context every forward of the trained model runs in: bf16 autocast over fp32 master weights on
        CUDA, else nothing. Scoring passes outside `train_step_on` (GRPO's old / reference log-probs, DPO's
        reference table, evaluation) use it too, so their numbers are the training forward's numbers."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self._use_autocast else nullcontext()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A CPU micro-batch on the training device, as the step sees it (single-document rows drop their
        document ids)."""
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        doc_ids = batch.get("document_ids")
        if doc_ids is not None and bool((doc_ids <= 0).all()):
            # One document per row (padding only at its end, never attended by real tokens): plain causal
            # attention is exact and lets the kernels skip the document mask.
            out["document_ids"] = None
        return out

    def train_step(self, loss_fn: LossFn, *, log: bool = True) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches from the data loader. With `log=False` nothing
        waits for the device (no host syncs)."""
        t0 = time.perf_counter()
        cpu_batches = [self.next_micro_batch() for _ in range(self.grad_accum)]
        return self.train_step_on(cpu_batches, loss_fn, log=log, data_wait_s=time.perf_counter() - t0)

    def train_step_on(
        self, cpu_batches: list[dict[str, Any]], loss_fn: LossFn, *, log: bool = True, data_wait_s: float = 0.0
    ) -> dict[str, float]:
        """One optimizer step over the given CPU micro-batches (every data-parallel rank passes its own, the
        same number of them): the gradient is the token-weighted mean over all of them on all ranks."""
        # Counted on the host before the copy, so the step itself never waits for the device.
        n_local = sum(int(count_targets(mb)) for mb in cpu_batches)
        tokens, flops = self._step_token_stats(cpu_batches)
        n_global, tokens, flops = self.global_sum([float(n_local), tokens, flops])
        if n_global == 0:
            raise RuntimeError(f"step {self.step + 1}: the global batch holds no target tokens")
        # FSDP averages gradients over data-parallel ranks; scaling by the degree turns that into a sum.
        scale = self.dp_degree / n_global

        cudagraphs = self.cfg.compile.cudagraphs and self.device.type == "cuda"
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, torch.Tensor] = {}
        autocast = self.forward_precision()
        defer_sync = self.cfg.parallelism.defer_grad_sync and self.parallel_dims.fsdp_enabled and len(cpu_batches) > 1
        for i, cpu_mb in enumerate(cpu_batches):
            if defer_sync:  # FSDP keeps unsharded gradients until the last micro-batch, then reduces once
                self.model.set_requires_gradient_sync(i == len(cpu_batches) - 1)
            mb = self.to_device(cpu_mb)
            with autocast:
                out = loss_fn(self.model, mb, n_global)
            # The device batch is not needed past the forward (autograd keeps what it saved): freed here, it is not
            # part of the step's memory peak (the end of backward, when every gradient exists, for large models).
            del mb
            loss_sum += out.loss_sum.detach().to(torch.float64)
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0) + v.detach().to(torch.float64)
            (out.loss_sum * scale).backward()
            del out
            if cudagraphs:
                self._own_grads()

        max_norm = self.cfg.training.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = bool(self.optimizer.defaults.get("fused"))
        if (fused and max_norm > 0 and isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW)
                and not any(isinstance(p, DTensor) for p in params)):
            # Clip inside fused AdamW's kernel (it divides the gradients by grad_scale, as under GradScaler)
            # instead of a separate pass over every gradient. Sharded (DTensor) parameters keep clip_grad_norm_:
            # a plain grad_scale beside DTensors has not been run on several GPUs here.
            grad_norm = total_grad_norm(self.optimizer, params)
            self.optimizer.grad_scale = clip_divisor(grad_norm, max_norm)
        else:
            grad_norm = clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        try:
            self._optimizer_step(grad_norm, fused)
        finally:
            self.optimizer.__dict__.pop("grad_scale", None)
        self.optimizer.zero_grad(set_to_none=not cudagraphs)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.step += 1

        metrics = {"lr": lr, "data_wait_s": data_wait_s, "tokens": tokens, "flops": flops, "target_tokens": n_global}
        if log:
            self.read_grad_norms()  # logging reads the device anyway
        if self.divergence.enabled:
            metrics["skipped_steps"] = self.divergence.skipped_steps
        if log:
            reduced = self._all_reduce_sum(torch.stack([loss_sum, *extra.values()])).tolist()
            metrics["loss"] = reduced[0] / n_global
            metrics["grad_norm"] = float(grad_norm)
            metrics.update({k: v / n_global for k, v in zip(extra, reduced[1:])})
        if log and self._offloader is not None:
            metrics.update(self._offloader.take_stats())
        return metrics

    def _own_grads(self) -> None:
        own_gradients(self.model.parameters(), self.__dict__.setdefault("_owned_grads", WeakIdKeyDictionary()))

    def _optimizer_step(self, grad_norm: torch.Tensor, fused: bool) -> None:
        if not self.divergence.enabled:
            self.optimizer.step()
        elif fused:
            # No host sync: fused AdamW skips a non-finite step on the device (found_inf, as under GradScaler);
            # the guard reads the norm later (one step late, or at log / checkpoint time) and counts it.
            self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self.divergence.record(self.step + 1, grad_norm)
        elif self.divergence.step_is_good(self.step + 1, float(grad_norm)):  # host read: one sync per step
            self.optimizer.step()
        else:
            self._warn_skipped([(self.step + 1, float(grad_norm))])

    def read_grad_norms(self, up_to_step: int | None = None) -> None:
        """Let the divergence guard read the gradient norms it recorded without a sync (all, or those of steps
        up to `up_to_step`), warning about each skipped step."""
        self._warn_skipped(self.divergence.resolve(up_to_step))

    def _warn_skipped(self, skipped: list[tuple[int, float]]) -> None:
        for step, norm in skipped:
            logger.warning("step %d: non-finite loss or gradient (norm %s): update skipped", step, norm)

    def _step_token_stats(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Real (non-padding) tokens and model flops actually computed in this step, on this rank."""
        real_tokens = 0
        attn = 0.0
        a = self.model_args
        for mb in micro_batches:
            doc_ids = mb.get("document_ids")
            real_tokens += mb["input_ids"].numel() if doc_ids is None else int((doc_ids >= 0).sum())
            lengths = document_lengths_from_ids(doc_ids, mb.get("position_ids"))
            attn += attention_flops(lengths, a.n_layers, a.n_heads, a.head_dim, causal=True, training=True)
        return float(real_tokens), dense_flops_per_token(*self._param_counts()) * real_tokens + attn

    def _param_counts(self) -> tuple[int, int]:
        if not hasattr(self, "_param_count_cache"):
            trainable = frozen = 0
            # MoE: a token computes with top_k of the experts only (the model says which share of a weight is used)
            for name, p in self.model.named_parameters():
                if ("tok_embeddings" in name or "embed_tokens" in name) and not self.model_args.tie_embeddings:
                    continue  # an embedding lookup is not a matmul
                n = p.numel() if not hasattr(p, "full_tensor") else p.shape.numel()
                n = int(n * model_hooks.param_active_fraction(self.model, name))
                if p.requires_grad:
                    trainable += n
                else:
                    frozen += n
            self._param_count_cache = (trainable, frozen)
        return self._param_count_cache

    def fit(self, loss_fn: LossFn) -> None:
        """Run optimizer steps until training.steps, logging and checkpointing on the way."""
        total = self.cfg.training.steps
        window_t0 = time.perf_counter()
        window: dict[str, float] = {}
        reset_peak_memory(self.device)
        while self.step < total:
            self.profiler.at_step_boundary(self.step + 1)  # profiling.*: traces the chosen steps
            log = self.metrics.should_log(self.step + 1) or self.step + 1 == total
            m = self.train_step(loss_fn, log=log)
            for k in ("tokens", "flops", "data_wait_s"):
                window[k] = window.get(k, 0.0) + m[k]
            window["steps"] = window.get("steps", 0) + 1
            if log:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_t0
                m["tokens_per_s"] = window["tokens"] / elapsed
                m["tokens_per_s_per_device"] = m["tokens_per_s"] / self.dist.world_size
                m["mfu"] = mfu_percent(window["flops"], elapsed, self.peak_flops, self.dist.world_size)
                m["data_wait_ms"] = 1000 * window["data_wait_s"] / window["steps"]
                m["mem_gib"] = peak_memory_gib(self.device)
                m.update(self._data_stats())
                if self._checkpoint_stall_s is not None:
                    m["checkpoint_stall_s"], self._checkpoint_stall_s = self._checkpoint_stall_s, None
                self.metrics.log(self.step, {k: v for k, v in m.items() if k not in ("flops", "data_wait_s")})
                window, window_t0 = {}, time.perf_counter()
            # The guard's counts must be current before a save (the save waits anyway); otherwise it reads the
            # previous step's norm, which the device has finished while this step's work is still queued.
            save_now = self.checkpoint.should_save(self.step, total)
            self.read_grad_norms(None if save_now else self.step - 1)
            if save_now and self.divergence.in_bad_streak:
                logger.warning("step %d: no checkpoint during non-finite steps (keeps the good ones)", self.step)
            elif save_now:
                self.save_checkpoint()
                window_t0 = time.perf_counter()  # keep checkpoint time out of throughput
            self.divergence.check_limit(self.step, self._last_checkpoint_name)
            hooks_t0 = time.perf_counter()
            for hook in self.step_hooks:
                hook()
            window_t0 += time.perf_counter() - hooks_t0  # evaluation time stays out of throughput
            if self.step < total and self.preemption.stop_requested():
                self._stop_for_preemption()
                break
        self.profiler.close()
        with self.preemption.busy():
            self.checkpoint.wait()  # the end-of-run save completes before the run ends
        self.read_grad_norms()  # every step's norm, the last one's included
        if self.divergence.in_bad_streak and not self.preempted:
            self.abnormal_end = (
                f"the run ended on {self.divergence.consecutive} step(s) skipped as non-finite (last good step "
                f"{self.divergence.last_good_step}); no checkpoint was saved for them"
            )
            logger.error("%s", self.abnormal_end)

    def _data_stats(self) -> dict[str, float]:
        local = getattr(self.data_loader, "stats", None)  # cumulative counters of this rank's loader
        if not local:
            return {}
        keys = sorted(k for k in local if not k.startswith("epoch"))  # counters add up over ranks; epochs do not
        summed = self._all_reduce_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=self.device))
        out = {f"data/{k}": v for k, v in zip(keys, summed.tolist())}
        out.update({f"data/{k}": float(v) for k, v in local.items() if k.startswith("epoch")})
        return out

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        with self.preemption.busy():  # a preemption signal during a save waits for it
            self.checkpoint.save(
                self.step, self.checkpoint_state(), layout=self.rank_layout(), fingerprint=self.run_fingerprint()
            )
        # The training stall: the whole save when synchronous, staging (plus the previous save's wait) when async.
        self._checkpoint_stall_s = time.perf_counter() - t0
        self._last_saved_step = self.step
        if self.dist.is_main:
            how = "started in the background" if self.cfg.checkpoint.async_save else "saved"
            logger.info("checkpoint step-%d %s; training stalled %.2fs", self.step, how, self._checkpoint_stall_s)

    def _last_checkpoint_name(self, at_or_before: int) -> str | None:
        self.checkpoint.wait()
        steps = [s for s in self.checkpoint.complete_steps() if s <= at_or_before]
        return str(self.checkpoint.step_dir(steps[-1])) if steps else None

    def _stop_for_preemption(self) -> None:
        """A preemption signal reached some rank: every rank saves this step (unless just saved) and fit() ends."""
        if self.dist.is_main:
            logger.warning("preemption signal received: saving a checkpoint at step %d and exiting", self.step)
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        with self.preemption.busy():
            self.checkpoint.wait()
        self.preempted = True
        if self.dist.is_main:
            logger.warning("preempted at step %d; the next start resumes from %s", self.step, self.checkpoint.step_dir(self.step))

    def export_hf(self) -> None:
        if not self.cfg.checkpoint.export_hf or self.preempted:
            return
        from posttrain.models import save_hf

        if self.abnormal_end is not None and not self._restore_last_checkpoint_weights():
            return
        out = self.output_dir / "hf"
        try:
            save_hf(self.model, out, tokenizer=self.tokenizer if self.dist.is_main else None)  # LoRA merged in
        except KeyError as err:  # a weight the family's HF adapter cannot name (e.g. a forked block)
            raise SystemExit(
                f"checkpoint.export_hf: {err.args[0]}; the DCP checkpoints in {self.checkpoint.folder} are kept "
                "(map the name in the family's hf_adapter.py, or set checkpoint.export_hf = false)"
            ) from err
        if self.dist.is_main:
            logger.info("exported Hugging Face checkpoint to %s", out)
        if self.cfg.lora.rank > 0:
            from posttrain.models.peft_adapter import save_peft_adapter

            adapter = save_peft_adapter(
                self.model, self.output_dir / "adapter", base_model_name_or_path=self.cfg.model.hf_path,
                tokenizer=self.tokenizer if self.dist.is_main else None,
                generation_config=getattr(self.model, "hf_generation_config", None),
            )
            if self.dist.is_main:
                logger.info("exported the LoRA adapter (PEFT format) to %s", adapter)

    def _restore_last_checkpoint_weights(self) -> bool:
        """After a run that ended on skipped steps: the weights of the last checkpoint, the export source."""
        step = self.checkpoint.latest_step()
        if step is None:
            logger.error("no Hugging Face export: no checkpoint was saved before the non-finite steps")
            return False
        self.checkpoint.load({"model_optimizer": ModelOptimizerState(self.model)}, step)
        logger.warning("exporting the weights of the last good checkpoint %s", self.checkpoint.step_dir(step))
        return True

    def close(self) -> None:
        self.preemption.restore()
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()
        destroy_distributed()
        if self.abnormal_end is not None:
            raise SystemExit(f"the run ended abnormally: {self.abnormal_end}")
