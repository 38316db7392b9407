"""Next-event cross-entropy plus the category head's cross-entropy, on the same target positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.losses import chunked_cross_entropy
from posttrain.trainer import LossOutput

IGNORE_INDEX = -100


def two_head_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_global: torch.Tensor) -> LossOutput:
    """A posttrain LossFn: sums over this micro-batch's targets (the trainer divides by the global count)."""
    args = model.args
    labels = batch["labels"]

    def heads(hidden: torch.Tensor, weight: torch.Tensor):
        event_sum, n_targets = chunked_cross_entropy(hidden, weight, labels, vocab_size=args.vocab_size)
        trained = labels != IGNORE_INDEX
        category_logits = model.category_head(hidden[trained]).float()
        category = labels[trained] // args.events_per_category
        category_sum = F.cross_entropy(category_logits, category, reduction="sum")
        correct = (category_logits.argmax(-1) == category).sum()
        return event_sum, category_sum, correct, n_targets

    event_sum, category_sum, correct, n_targets = model(
        batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"], output_fn=heads
    )
    return LossOutput(
        loss_sum=event_sum + args.category_loss_weight * category_sum,
        n_targets=n_targets,
        metrics={
            "event_ce": event_sum.detach(),
            "category_ce": category_sum.detach(),
            "category_acc": correct.detach().float(),
        },
    )
