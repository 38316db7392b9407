"""The roles of the GRPO loop as plain classes; the controller makes them Ray actors (`ray.remote(cls)`).

* `PolicyWorker`: one per trainer rank. Together they form one torch.distributed group and train SPMD with
  the ordinary `Trainer` (FSDP / TP from `parallelism.*`, LoRA, optimizer, lr schedule, checkpoints). The
  frozen reference model lives in the same actors: the policy with its LoRA adapters off, or a second copy
  built and sharded like the policy. Rows of completions are fed to `trainer.train_step` as micro-batches.
* `RolloutWorker`: one rollout engine (native or vLLM), generating and taking weight updates.

Nothing here knows about Ray except `PolicyWorker.address` (a free port for the process group's rendezvous).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from posttrain.config import JobConfig
from posttrain.config.sections import GRPOSection
from posttrain.inference import build_engine
from posttrain.losses import find_target_index, fused_token_log_probs
from posttrain.models.common.lora import adapters_disabled, has_lora
from posttrain.rl.packed_batches import micro_batches, sliding_window_refusal
from posttrain.rl.weight_group import (
    BucketLayout, WeightGroup, bucket_layout, host_store, join_weight_group, receive_bucket, send_bucket,
)
from posttrain.rl.weight_sync import SharedBucket, hf_weight_buckets, open_bucket, share_bucket
from posttrain.trainer import LossOutput, Trainer, build_training_model

logger = logging.getLogger("posttrain")


def set_cpu_threads(threads: int) -> None:
    """Ray starts actors with OMP_NUM_THREADS=1; a CPU actor that computes wants the machine's cores."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))


# ------------------------------------------------------------------------------------------ policy


def response_log_probs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float, chunk_size: int, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs `[B, S]` of the labels (0 where the label is -100) at `temperature`, and with
    `entropy` the per-token entropy of the same distribution (no gradient). Only response positions are projected."""
    labels = batch["labels"]
    vocab_size = model.args.vocab_size
    # the flat positions of the labels: made on the host by PolicyWorker (`with_target_index`), else found here,
    # which waits for the device (their count is only known there)
    index = batch.get("target_index")
    if index is None:
        index = find_target_index(labels)

    def output_fn(hidden: torch.Tensor, weight: torch.Tensor):
        h, targets = hidden.flatten(0, 1).index_select(0, index), labels.flatten().index_select(0, index)
        out = fused_token_log_probs(h, weight, targets, vocab_size=vocab_size, chunk_size=chunk_size,
                                    temperature=temperature, entropy=entropy)  # one pass for both
        logp, ent = out if entropy else (out, None)
        if h.shape[0] == 0 and torch.is_grad_enabled():  # padding rows only: a (zero) gradient still reaches
            logp = logp + 0.0 * hidden.sum()  # every parameter, so the backward (and FSDP's reduce) runs alike
        return logp, ent

    flat_logp, flat_ent = model(
        batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"], output_fn=output_fn
    )
    logp = _scatter_to_positions(flat_logp, labels.shape, index)
    ent = None if flat_ent is None else _scatter_to_positions(flat_ent.float(), labels.shape, index)
    return logp, ent


def with_target_index(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` (on the host) with `target_index`: the flat positions of its labels, for `response_log_probs`."""
    return {**batch, "target_index": find_target_index(batch["labels"])}


def _scatter_to_positions(values: torch.Tensor, shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
    """Per-target `values` back to `[B, S]` at the flat positions `index` (0 elsewhere)."""
    out = torch.zeros(shape.numel(), dtype=values.dtype, device=values.device)
    return out.index_copy(0, index, values).view(shape)


def grpo_loss_fn(
    model: nn.Module, batch: dict[str, torch.Tensor], n_global: Any, *, grpo: GRPOSection, chunk_size: int
) -> LossOutput:
    """The clipped GRPO objective of one micro-batch (a sum, normalised by the trainer over the minibatch)."""
    from posttrain.rl.algorithms import grpo_loss

    temperature = grpo.temperature if grpo.temperature > 0 else 1.0
    logp, entropy = response_log_probs(model, batch, temperature=temperature, chunk_size=chunk_size, entropy=True)
    mask = batch["labels"] != -100
    # old_logp: the trainer-side log-probs of the policy that sampled the batch. Recomputed before the update
    # when there are several updates per step; with one update the policy is still that policy, so the
    # forward's own detached values are the same numbers. old_logprobs = "engine" (one update per step, see
    # check_grpo_config) adds the truncated importance-sampling weight min(exp(old - engine), tis_cap).
    engine_mode = grpo.old_logprobs == "engine"
    old = batch.get("old_logp")
    if old is None:
        old = logp.detach()
    loss_sum, n_units, stats = grpo_loss(
        logp, old, batch["advantages"], mask,
        clip_low=grpo.clip_low, clip_high=grpo.clip_high,
        ref_logp=batch.get("ref_logp") if grpo.kl_mode == "loss" and grpo.kl_coef > 0 else None,
        kl_coef=grpo.kl_coef if grpo.kl_mode == "loss" else 0.0,
        engine_logp=batch.get("engine_logp") if engine_mode else None,
        tis_cap=grpo.tis_cap if engine_mode else None,
        agg=grpo.loss_agg, entropy=entropy,
        # packed rows (grpo.micro_batch_tokens) hold several completions: sequence-mean separates them by
        # document id; None (one document per row, see Trainer.to_device) means one completion per row
        sequence_ids=batch.get("document_ids") if grpo.loss_agg == "sequence_mean" else None,
    )
    # stats are sums over tokens; the controller divides each by the "tokens" sum (the trainer's division by
    # the loss units cancels out)
    return LossOutput(loss_sum=loss_sum, n_targets=torch.as_tensor(n_units), metrics=stats)


class SetupRefused(Exception):
    """A setting the policy worker's trainer refused (its one-line SystemExit), raised as an exception so that Ray
    hands it to the controller (a SystemExit ends the actor's process: the controller would get ActorDiedError)."""


class PolicyWorker:
    """One rank of the policy trainer group (with its share of the reference model)."""

    def address(self) -> tuple[str, int]:
        """This node's address and a free port: the rendezvous of the group when this is rank 0."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, cfg: JobConfig, *, rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, Any]:
        try:
            return self._setup(cfg, rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port)
        except SystemExit as err:
            raise SetupRefused(str(err.code)) from None

    def _setup(self, cfg: JobConfig, *, rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, Any]:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not torch.cuda.is_available():
            set_cpu_threads(cfg.grpo.cpu_threads)
        self.grpo = cfg.grpo
        self.updates_per_step = cfg.grpo.epochs * cfg.grpo.minibatches
        micro = max(cfg.training.micro_batch_size, 1)
        # The lr schedule counts optimizer steps (epochs x minibatches per GRPO step); a trainer step takes
        # however many micro-batches the controller sends (`train_step_on` below).
        trainer_cfg = replace(cfg, training=replace(
            cfg.training, steps=cfg.training.steps * self.updates_per_step, micro_batch_size=micro,
            batch_size=micro * world_size,
        ), metrics=replace(cfg.metrics, tensorboard=False))
        # The controller writes metrics.jsonl / tb/: this trainer writes none.
        self.trainer = Trainer(trainer_cfg, write_metrics=False)
        self.chunk_size = cfg.training.loss_chunk_size
        self.micro = cfg.training.micro_batch_size  # 0: a rank's whole share in one forward
        self.micro_tokens = cfg.grpo.micro_batch_tokens  # > 0: packed rows of this many positions instead
        self.share_prompts = cfg.grpo.share_prompts
        window = getattr(self.trainer.model_args, "sliding_window", None)
        if self.share_prompts and window:
            raise SystemExit(sliding_window_refusal(window, "the model"))
        self.pad_id = self.trainer.tokenizer.pad_id if self.trainer.tokenizer is not None else 0
        self.reference: nn.Module | None = None
        self.reference_is_policy = False
        if cfg.grpo.kl_coef > 0:
            if has_lora(self.trainer.model):  # the frozen base is the reference: no second copy
                self.reference_is_policy = True
            else:
                self.reference = build_training_model(
                    replace(cfg, activation_checkpoint=replace(cfg.activation_checkpoint, mode="none", offload_blocks=0)),
                    parallel_dims=self.trainer.parallel_dims, device=self.trainer.device,
                    mixed_precision=self.trainer.mixed_precision,
                    tokenizer_vocab_size=self.trainer.tokenizer.vocab_size if self.trainer.tokenizer else 0,
                    frozen=True,
                )
                self.reference.requires_grad_(False)
                self.reference.eval()
        return {"dp_rank": self.trainer.dp_rank, "dp_degree": self.trainer.dp_degree,
                "device": str(self.trainer.device), "vocab_size": self.trainer.model_args.vocab_size}

    # -- checkpoints: the trainer's manager, plus the controller's state (prompt stream, counters) --------

    def _state(self, controller_state: Any) -> dict[str, Any]:
        from posttrain.checkpoint import Shared

        return {**self.trainer.checkpoint_state(), "controller": Shared(controller_state)}

    def resume(self) -> dict[str, Any] | None:
        """Load the latest complete checkpoint of output_dir: {"step", "controller"}, or None."""
        if not self.trainer.cfg.checkpoint.resume:
            return None
        state = self._state(None)
        step = self.trainer.load_checkpoint(state)
        if step is None:
            return None
        self.trainer.step = step * self.updates_per_step
        return {"step": step, "controller": state["controller"].obj}

    def save(self, step: int, controller_state: Any) -> None:
        self.trainer.checkpoint.save(step, self._state(controller_state), layout=self.trainer.rank_layout(),
                                     fingerprint=self.trainer.run_fingerprint())
        self.trainer.checkpoint.wait()

    # -- scoring ---------------------------------------------------------------------------------------

    def _micro_batches(self, rows: list[dict[str, Any]], *, sequence_targets: bool = False):
        """`micro_batches`, each CPU batch with its `target_index` (see `response_log_probs`) and, on CUDA, in
        pinned memory (a copy from pageable memory waits for the device to finish its queued work)."""
        pin = self.trainer.device.type == "cuda"
        for indices, batch, values_of in micro_batches(
            rows, micro_rows=self.micro, micro_tokens=self.micro_tokens, pad_id=self.pad_id,
            sequence_targets=sequence_targets, share_prompts=self.share_prompts,
            forwards_over_ranks=self._most_over_ranks,
        ):
            batch = with_target_index(batch)
            if pin:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            yield indices, batch, values_of

    def _most_over_ranks(self, n: int) -> int:
        """The largest `n` of the data-parallel ranks: every rank runs as many forwards (FSDP's collectives)."""
        dp_mesh = self.trainer.parallel_dims.dp_mesh
        if dp_mesh is None:
            return n
        most = torch.tensor([n], device=self.trainer.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=dp_mesh.get_group())
        return int(most.item())

    @torch.no_grad()
    def log_probs(self, rows: list[dict[str, Any]], *, old: bool, ref: bool, entropy: bool) -> dict[str, list]:
        """Per-token log-probs of each row's response under the policy (`old`, with the `entropy`) and the
        reference (`ref`), as lists per row. Every rank of the group calls it with its own rows."""
        temperature = self.grpo.temperature if self.grpo.temperature > 0 else 1.0
        out: dict[str, list] = {"old_logp": [], "ref_logp": [], "entropy": []}
        wanted = [k for k, on in (("old_logp", old), ("ref_logp", ref), ("entropy", entropy)) if on]
        for key in wanted:  # a row in no forward (no response token) keeps []
            out[key] = [[] for _ in rows]
        model = self.trainer.model
        model.eval()
        try:
            with self.trainer.forward_precision():
                self._score_rows(rows, out, old=old, ref=ref, entropy=entropy, temperature=temperature)
        finally:
            model.train()
        return out

    def _score_rows(self, rows: list[dict[str, Any]], out: dict[str, list], *, old: bool, ref: bool, entropy: bool,
                    temperature: float) -> None:
        model = self.trainer.model
        for indices, cpu_batch, values_of in self._micro_batches(rows):
            batch = self.trainer.to_device(cpu_batch)
            found: dict[str, torch.Tensor] = {}
            if old or entropy:
                logp, ent = response_log_probs(model, batch, temperature=temperature, chunk_size=self.chunk_size,
                                               entropy=entropy)
                if old:
                    found["old_logp"] = logp.float()
                if entropy:
                    found["entropy"] = ent
            if ref:
                ref_model = model if self.reference_is_policy else self.reference
                with adapters_disabled(model) if self.reference_is_policy else nullcontext():
                    ref_logp, _ = response_log_probs(ref_model, batch, temperature=temperature,
                                                     chunk_size=self.chunk_size)
                found["ref_logp"] = ref_logp.float()
            for key, values in found.items():
                for i, v in zip(indices, values_of(values.cpu())):
                    out[key][i] = v

    # -- training --------------------------------------------------------------------------------------

    def train_minibatch(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step on this rank's rows of a minibatch (every rank sends as many micro-batches)."""
        from functools import partial

        t0 = time.perf_counter()
        sequence_targets = self.grpo.loss_agg == "sequence_mean"
        batches = [b for _, b, _ in self._micro_batches(rows, sequence_targets=sequence_targets)]
        t_packed = time.perf_counter()
        loss_fn = partial(grpo_loss_fn, grpo=self.grpo, chunk_size=self.chunk_size)
        metrics = self.trainer.train_step_on(batches, loss_fn)
        out = {k: float(v) for k, v in metrics.items() if v is not None}
        # this call's own time (the controller's "update" adds Ray's round trip): packing, then the step
        out.update(pack_s=t_packed - t0, worker_s=time.perf_counter() - t0)
        return out

    # -- weight sync and export ------------------------------------------------------------------------

    def weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's HF-named full weights in buckets (a Ray streaming generator; rank 0 yields)."""
        yield from hf_weight_buckets(self.trainer.model, bucket_bytes=bucket_bytes, device="cpu")

    def shared_weight_buckets(self, bucket_bytes: int) -> Iterator[SharedBucket]:
        """`weight_buckets` as CUDA IPC handles of full tensors left on this actor's GPU (colocated engines)."""
        for bucket in hf_weight_buckets(self.trainer.model, bucket_bytes=bucket_bytes, device=self.trainer.device):
            yield share_bucket(bucket)

    # the weight-update group (grpo.weight_sync = "collective"): this actor is its rank 0 when it is policy rank 0

    def host_weight_group(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Serve the group's rendezvous: (this node's address, port)."""
        import ray

        self._weight_store, port = host_store(world_size, timeout_s)
        return ray.util.get_node_ip_address(), port

    def join_weight_group(self, world_size: int, timeout_s: float) -> None:
        store, self._weight_store = self._weight_store, None  # the group holds it from here on
        self.weight_group = join_weight_group(0, world_size, device=self.trainer.device, timeout_s=timeout_s,
                                              store=store)

    def broadcast_weight_buckets(self, bucket_bytes: int) -> Iterator[BucketLayout]:
        """`weight_buckets` over the weight-update group: rank 0 yields each bucket's layout (the engines then
        join its broadcast) and broadcasts the bucket; the other ranks take part in the gathers."""
        for bucket in hf_weight_buckets(self.trainer.model, bucket_bytes=bucket_bytes, device=self.trainer.device):
            layout = bucket_layout(bucket)
            yield layout
            send_bucket(self.weight_group, bucket, layout)

    def export_hf(self) -> None:
        self.trainer.export_hf()

    def close(self) -> None:
        group: WeightGroup | None = getattr(self, "weight_group", None)
        if group is not None:
            group.close()
            self.weight_group = None
        self.trainer.close()


# ------------------------------------------------------------------------------------------ rollout


class RolloutWorker:
    """One rollout engine. Its weights start from `model.hf_path` and follow the policy through syncs."""

    def __init__(self, kind: str, hf_path: str, *, device: str, dtype: str, threads: int = 0, **engine_kw: Any) -> None:
        if device == "cpu":
            set_cpu_threads(threads)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.engine = build_engine(kind, hf_path, device=device, dtype=torch_dtype, **engine_kw)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
        self.weight_group: WeightGroup | None = None

    def generate(self, prompt_token_ids: list[list[int]], sampling: Any) -> list[Any]:
        return self.engine.generate(prompt_token_ids, sampling)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self.engine.update_weights(named_tensors)
        return len(named_tensors)

    def update_shared_weights(self, shared: SharedBucket) -> int:
        """`update_weights` from CUDA IPC handles (`PolicyWorker.shared_weight_buckets` on the same GPU)."""
        named = open_bucket(shared)
        self.engine.update_weights(named)
        torch.cuda.synchronize()  # the copies are done before the sender may reuse the memory
        return len(named)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.weight_group = join_weight_group(rank, world_size, device=self.device, timeout_s=timeout_s,
                                              host=host, port=port)

    def receive_weights(self, layout: BucketLayout) -> int:
        """`update_weights` from one bucket policy rank 0 broadcasts over the weight-update group."""
        named = receive_bucket(self.weight_group, layout)
        self.engine.update_weights(named)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(named)

    def close(self) -> None:
        if self.weight_group is not None:
            self.weight_group.close()
            self.weight_group = None
        self.engine.close()
