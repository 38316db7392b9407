"""Supervised fine-tuning: packed chat / prompt-completion / text rows, cross-entropy on the trained tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from posttrain.config import JobConfig
from posttrain.datasets.dataloader import build_eval_dataloader, build_sft_dataloader
from posttrain.evaluation.generation import generation_eval_from_config
from posttrain.evaluation.validation import ValidationLoss
from posttrain.extensions import load_callable
from posttrain.losses import cross_entropy_for
from posttrain.models import protocol as model_hooks
from posttrain.trainer import LossFn, LossOutput, Trainer


def sft_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], n_global: torch.Tensor, *, chunk_size: int,
    loss_impl: str = "fused",
) -> LossOutput:
    """Sum of token cross-entropies over the micro-batch; the full [tokens, vocab] logits never exist."""
    output_fn = partial(
        cross_entropy_for(loss_impl), labels=batch["labels"], vocab_size=model.args.vocab_size, chunk_size=chunk_size
    )
    if loss_impl == "fused" and batch.get("target_index") is not None:  # made with the batch: no device sync
        output_fn = partial(output_fn, target_index=batch["target_index"])
    loss_sum, n_targets = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        output_fn=output_fn,
    )
    # MoE families: routing statistics of this forward (logged per target token like the loss), and
    # coef * load-balancing loss, weighted by this micro-batch's targets like the cross-entropy
    metrics = {k: v * n_targets for k, v in model_hooks.moe_metrics(model).items()}
    aux = model_hooks.moe_aux_loss(model)
    if aux is not None:
        loss_sum = loss_sum + aux * n_targets
    return LossOutput(loss_sum=loss_sum, n_targets=n_targets, metrics=metrics)


def build_loss_fn(cfg: JobConfig) -> LossFn:
    """`training.loss`: the cross-entropy (`training.loss_impl`), or the user's `fn(model, batch, n_global) -> LossOutput`."""
    if cfg.training.loss == "cross_entropy":
        return partial(sft_loss, chunk_size=cfg.training.loss_chunk_size, loss_impl=cfg.training.loss_impl)
    try:
        return load_callable(cfg.training.loss, key="training.loss")
    except ValueError as e:
        raise SystemExit(str(e)) from e


def run(cfg: JobConfig) -> None:
    loss_fn = build_loss_fn(cfg)
    trainer = Trainer(cfg)  # no tokenizer for token-id data (data.format = tokens): tokenizer is None
    layout = dict(
        seq_len=cfg.training.seq_len,
        micro_batch_size=trainer.micro_batch_size,
        dp_rank=trainer.dp_rank,
        dp_world_size=trainer.dp_degree,
        vocab_size=trainer.model_args.vocab_size,
    )
    trainer.set_data_loader(build_sft_dataloader(cfg.data, trainer.tokenizer, seed=cfg.job.seed, **layout))
    if cfg.data.eval_path:  # eval_loss every evaluation.freq steps and at the end
        eval_loader = build_eval_dataloader(cfg.data, trainer.tokenizer, **layout)
        e = cfg.evaluation
        trainer.step_hooks.append(ValidationLoss(trainer, eval_loader, freq=e.freq, max_batches=e.max_batches))
    generation_eval = generation_eval_from_config(trainer)  # eval_accuracy on evaluation.generation_path
    if generation_eval is not None:
        trainer.step_hooks.append(generation_eval)
    trainer.resume()
    trainer.fit(loss_fn)
    trainer.export_hf()
    trainer.close()
