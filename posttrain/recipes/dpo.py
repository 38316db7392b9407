"""Direct preference optimization: sigmoid DPO, conservative DPO (label smoothing), IPO and SimPO.

One micro-batch holds packed [chosen, rejected] pairs (see `posttrain.datasets.preference`); one policy forward
scores both answers of every pair, the chunked head giving per-sequence sums of token log-probs. Reference
log-probs (`dpo.reference = "model"`) come from a frozen copy of the starting model, built and sharded like
the policy, evaluated under no_grad; with `dpo.precompute_reference` it scores every pair once before training
and is freed. With a LoRA policy (`lora.rank > 0`) the reference is the policy itself with its adapters
switched off (their scaling set to 0 for that forward): the frozen base IS the starting model, so no second
copy exists. `dpo.reference = "none"` (and SimPO, which is reference-free) needs no reference at all.

The trainer averages over pairs: a batch's `n_targets` is its pair count. Logged per pair: loss,
reward_accuracy (ties count one half, so a policy equal to its reference scores 0.5), reward_margin,
chosen_reward / rejected_reward (implicit rewards) and chosen_logp / rejected_logp (policy sums); with
data.eval_path the same on held-out pairs as eval_*, before training and at the end.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from posttrain.config import JobConfig
from posttrain.config.sections import DPOSection
from posttrain.evaluation.generation import generation_eval_from_config
from posttrain.losses.preference import preference_loss, sequence_log_probs
from posttrain.models.common.lora import adapters_disabled, has_lora
from posttrain.recipes.pairwise import (
    build_preference_loader,
    evaluate_pairs,
    every_pair_once,
)
from posttrain.trainer import LossOutput, Trainer, build_training_model

logger = logging.getLogger("posttrain")


def pair_log_probs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int, loss_impl: str = "fused"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs, rejected log-probs, chosen lengths, rejected lengths), each `[pairs]`, from one forward."""
    output_fn = partial(
        sequence_log_probs, labels=batch["labels"], sequence_ids=batch["sequence_ids"],
        n_sequences=2 * int(batch["n_targets"]), vocab_size=model.args.vocab_size, chunk_size=chunk_size,
        loss_impl=loss_impl, target_index=batch.get("target_index"),
    )
    logps, lengths = model(
        batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"], output_fn=output_fn
    )
    return logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]


class ReferenceLogProbs:
    """Where reference log-probs come from: a frozen model scored per batch (the LoRA policy itself with its
    adapters off when `adapters_off`), or a table filled once by `precompute`."""

    def __init__(
        self, model: nn.Module | None, *, chunk_size: int, adapters_off: bool = False, loss_impl: str = "fused"
    ) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.loss_impl = loss_impl
        self.adapters_off = adapters_off
        self.table: torch.Tensor | None = None  # [pairs in the dataset, 2] once precomputed

    def _score(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with adapters_disabled(self.model) if self.adapters_off else nullcontext():
            chosen, rejected, _, _ = pair_log_probs(self.model, batch, chunk_size=self.chunk_size, loss_impl=self.loss_impl)
        return chosen.float(), rejected.float()

    @torch.no_grad()
    def precompute(self, batches, n_pairs: int, device: torch.device, to_device) -> None:
        """Score every pair of `batches` (this rank's, as `every_pair_once` gives them) once, keep the table and
        drop the reference model."""
        table = torch.full((n_pairs, 2), float("nan"), dtype=torch.float32, device=device)
        for cpu_batch, _ in batches:  # a repeated batch (kept for FSDP's collectives) writes the same values
            batch = to_device(cpu_batch)
            table[batch["pair_ids"]] = torch.stack(self._score(batch), dim=1)
        self.table = table
        self.model = None

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.table is not None:
            ref = self.table[batch["pair_ids"]]
            return ref[:, 0], ref[:, 1]
        if self.model is None:
            return None, None
        return self._score(batch)


def dpo_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    n_global: torch.Tensor | None,
    *,
    dpo: DPOSection,
    reference: ReferenceLogProbs,
    chunk_size: int,
    loss_impl: str = "fused",
) -> LossOutput:
    """Summed preference loss of the micro-batch's pairs, with per-pair metric sums."""
    chosen, rejected, chosen_len, rejected_len = pair_log_probs(model, batch, chunk_size=chunk_size, loss_impl=loss_impl)
    ref_chosen, ref_rejected = (None, None) if dpo.loss_type == "simpo" else reference(batch)
    out = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, loss_type=dpo.loss_type, beta=dpo.beta,
        label_smoothing=dpo.label_smoothing, simpo_gamma=dpo.simpo_gamma,
        chosen_lengths=chosen_len, rejected_lengths=rejected_len,
    )
    margin = out.chosen_rewards - out.rejected_rewards
    metrics = {
        "reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).sum(),
        "reward_margin": margin.sum(),
        "chosen_reward": out.chosen_rewards.sum(),
        "rejected_reward": out.rejected_rewards.sum(),
        "chosen_logp": chosen.detach().sum(),
        "rejected_logp": rejected.detach().sum(),
    }
    n_pairs = torch.tensor(int(batch["n_targets"]), device=chosen.device)
    return LossOutput(loss_sum=out.losses.sum(), n_targets=n_pairs, metrics=metrics)


def check_dpo_config(dpo: DPOSection) -> None:
    if dpo.beta <= 0:
        raise SystemExit(f"dpo.beta must be > 0, got {dpo.beta}")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        raise SystemExit(f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.loss_type == "ipo" and dpo.label_smoothing:
        raise SystemExit("dpo.label_smoothing applies to the sigmoid and simpo losses; set it to 0 for ipo")


def build_reference(trainer: Trainer) -> nn.Module:
    """A frozen copy of the policy's starting point (same model.* settings and seed), sharded like it."""
    reference = build_training_model(
        replace(trainer.cfg, activation_checkpoint=replace(trainer.cfg.activation_checkpoint, mode="none", offload_blocks=0)),
        parallel_dims=trainer.parallel_dims, device=trainer.device, mixed_precision=trainer.mixed_precision,
        tokenizer_vocab_size=trainer.tokenizer.vocab_size, frozen=True,
    )
    reference.requires_grad_(False)
    reference.eval()
    return reference


def run(cfg: JobConfig) -> None:
    dpo = cfg.dpo
    check_dpo_config(dpo)
    trainer = Trainer(cfg)
    chunk_size = cfg.training.loss_chunk_size
    heads = {"chunk_size": chunk_size, "loss_impl": cfg.training.loss_impl}
    trainer.set_data_loader(build_preference_loader(trainer, cfg.data.path))
    eval_loader = None
    if cfg.data.eval_path:
        eval_loader = build_preference_loader(trainer, cfg.data.eval_path, shuffle=False, field="data.eval_path")

    needs_reference = dpo.reference == "model" and dpo.loss_type != "simpo"
    if needs_reference and has_lora(trainer.model):  # the frozen base is the reference: no second copy
        reference = ReferenceLogProbs(trainer.model, adapters_off=True, **heads)
    else:
        reference = ReferenceLogProbs(build_reference(trainer) if needs_reference else None, **heads)
    loss_fn = partial(dpo_loss, dpo=dpo, reference=reference, **heads)
    eval_reference = reference
    if needs_reference and dpo.precompute_reference:
        # under the training forward's precision: the table holds the numbers the policy's forward would get
        with trainer.forward_precision():
            if eval_loader is not None:  # the held-out pairs get their own table from the same model
                eval_reference = ReferenceLogProbs(reference.model, adapters_off=reference.adapters_off, **heads)
                eval_reference.precompute(
                    every_pair_once(trainer, eval_loader), len(eval_loader.pairs), trainer.device, trainer.to_device
                )
            reference.precompute(
                every_pair_once(trainer, trainer.data_loader), len(trainer.data_loader.pairs), trainer.device,
                trainer.to_device,
            )
        logger.info("reference log-probs precomputed for %d pairs; reference model freed", len(trainer.data_loader.pairs))
    eval_fn = partial(dpo_loss, dpo=dpo, reference=eval_reference, **heads)

    def periodic_pair_eval() -> None:  # every evaluation.freq steps (the last step's comes after fit)
        freq = cfg.evaluation.freq
        if freq > 0 and trainer.step % freq == 0 and trainer.step < cfg.training.steps:
            trainer.metrics.log(trainer.step, evaluate_pairs(trainer, eval_loader, eval_fn))

    if eval_loader is not None:
        trainer.step_hooks.append(periodic_pair_eval)
    generation_eval = generation_eval_from_config(trainer)  # eval_accuracy on evaluation.generation_path
    if generation_eval is not None:
        trainer.step_hooks.append(generation_eval)

    trainer.resume()
    if eval_loader is not None and trainer.step == 0:
        trainer.metrics.log(0, evaluate_pairs(trainer, eval_loader, eval_fn))
    trainer.fit(loss_fn)
    if eval_loader is not None:
        trainer.metrics.log(trainer.step, evaluate_pairs(trainer, eval_loader, eval_fn))
    trainer.export_hf()
    trainer.close()
