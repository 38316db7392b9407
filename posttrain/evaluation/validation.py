"""Validation loss on held-out data (`data.eval_path`) during training: `eval_loss` in metrics.jsonl.

`eval_loss` is the token-weighted mean cross-entropy over every held-out target token of all data-parallel
ranks (sum of token losses over all ranks / number of target tokens over all ranks), the plain next-token
loss whatever the training loss is (no MoE auxiliary term, no user loss). Each rank reads its share of the
packed eval rows (`build_eval_dataloader`: the same number of batches on every rank, so FSDP's collectives
line up); `evaluation.max_batches` caps the batches per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from posttrain.losses import cross_entropy_for

def evaluation_due(step: int, total: int, freq: int) -> bool:
    """Every `freq` steps (0: never periodically) and at the last step."""
    return step == total or (freq > 0 and step % freq == 0)


@torch.no_grad()
def local_validation_loss(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    chunk_size: int = 0,
    max_batches: int = 0,
    loss_impl: str = "fused",
) -> tuple[float, int]:
    """(sum of token cross-entropies, number of target tokens) over this rank's `batches` (at most
    `max_batches`, 0 = all), with the model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    loss_sum, n_targets = 0.0, 0
    try:
        for i, cpu_batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = to_device(cpu_batch)
            output_fn = partial(
                cross_entropy_for(loss_impl), labels=batch["labels"], vocab_size=model.args.vocab_size, chunk_size=chunk_size
            )
            s, n = model(
                batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                output_fn=output_fn,
            )
            loss_sum += float(s)
            n_targets += int(n)
    finally:
        model.train(was_training)
    return loss_sum, n_targets


class ValidationLoss:
    """A trainer step hook: logs `eval_loss` / `eval_tokens` every `freq` steps and at the last step (summed over
    data-parallel ranks with the trainer's `global_sum`)."""

    def __init__(self, trainer: Any, eval_loader: Iterable[dict[str, Any]], *, freq: int, max_batches: int) -> None:
        self.trainer = trainer
        self.eval_loader = eval_loader
        self.freq = freq
        self.max_batches = max_batches

    def evaluate(self) -> dict[str, float]:
        t = self.trainer
        with t.forward_precision():
            loss_sum, n = local_validation_loss(
                t.model, self.eval_loader, to_device=t.to_device, chunk_size=t.cfg.training.loss_chunk_size,
                max_batches=self.max_batches, loss_impl=t.cfg.training.loss_impl,
            )
        loss_sum, n = t.global_sum([loss_sum, float(n)])
        if n == 0:
            raise SystemExit("data.eval_path holds no target tokens (nothing to compute eval_loss on)")
        return {"eval_loss": loss_sum / n, "eval_tokens": n}

    def __call__(self) -> None:
        t = self.trainer
        if not evaluation_due(t.step, t.cfg.training.steps, self.freq):
            return
        t.metrics.log(t.step, self.evaluate())  # the console line shows eval_loss
