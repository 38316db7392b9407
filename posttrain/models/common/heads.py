"""Output heads swappable by config (``model.head``): what the final hidden states are projected to.

    lm              the language-model head ``model.output`` (default; nothing is added)
    value           a scalar per position: ``model.score = Linear(dim, 1)`` (value / reward models)
    classification  ``num_labels`` logits per position: ``model.score = Linear(dim, num_labels)``

A non-LM head is a plain ``nn.Linear`` attached to the model as ``model.score`` (Hugging Face's name in
``*ForSequenceClassification``), so FSDP wraps it with the root module and its weight is unsharded during
the model's forward. Call it through the forward's ``output_fn`` hook, never outside the forward:

    scores = model(input_ids, position_ids=..., document_ids=..., output_fn=head_output_fn(model))
    rewards = last_token_scores(scores, document_ids)      # one score per (packed) sequence

The LM path (``model(input_ids)`` -> logits, or ``output_fn(hidden, output.weight)``) is unchanged; the LM
head stays on the model either way (a reward model initialized from an LM keeps it but does not train it
unless the recipe uses it).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

HEAD_MODULE = "score"


@dataclass(frozen=True)
class HeadKind:
    name: str
    description: str
    out_features: Callable[[int], int] | None  # num_labels -> outputs; None: the LM head, nothing to attach


HEADS: dict[str, HeadKind] = {
    "lm": HeadKind("lm", "next-token logits from model.output (default)", None),
    "value": HeadKind("value", "one scalar per position (value / reward model)", lambda num_labels: 1),
    "classification": HeadKind("classification", "num_labels logits per position", lambda num_labels: num_labels),
}


def get_head_kind(name: str) -> HeadKind:
    if name not in HEADS:
        raise ValueError(f"model.head: unknown head {name!r}; choose from {sorted(HEADS)}")
    return HEADS[name]


def is_head_param(name: str) -> bool:
    """Whether a (canonical) parameter name belongs to a non-LM head, which no base checkpoint holds."""
    return name.startswith(HEAD_MODULE + ".")


def attach_head(model: nn.Module, kind: str, num_labels: int = 2) -> nn.Linear | None:
    """Add ``model.score`` for a non-LM head (on the device / dtype of the model's final norm, so a model
    built on the meta device gets a meta head); None for the LM head."""
    head = get_head_kind(kind)
    if head.out_features is None:
        return None
    if kind == "classification" and num_labels < 2:
        raise ValueError(f"model.num_labels must be at least 2 for a classification head, got {num_labels}")
    ref = model.norm.weight
    score = nn.Linear(model.args.dim, head.out_features(num_labels), bias=False, device=ref.device, dtype=ref.dtype)
    setattr(model, HEAD_MODULE, score)
    model.head_kind = kind
    return score


def get_head(model: nn.Module) -> nn.Linear | None:
    return getattr(getattr(model, "_orig_mod", model), HEAD_MODULE, None)


@torch.no_grad()
def init_head(model: nn.Module, seed: int) -> None:
    """Normal(0, 1/sqrt(dim + 1)) (as in TRL's value heads), drawn in full from ``seed`` on the CPU; each rank
    copies its own slice, so the values do not depend on the parallel layout."""
    from posttrain.models.sharded_load import local_shard

    score = get_head(model)
    if score is None:
        return
    full = torch.empty(score.weight.shape, dtype=torch.float32)
    full.normal_(0.0, 1.0 / math.sqrt(score.weight.shape[1] + 1),
                 generator=torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"score")))
    local, slices = local_shard(score.weight)
    local.copy_(full[slices])


def head_output_fn(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An ``output_fn`` for ``model(..., output_fn=...)`` that applies the non-LM head to the final hidden
    states: [B, S] for a value head, [B, S, num_labels] for a classification head."""
    score = get_head(model)
    if score is None:
        raise ValueError("the model has no non-LM head: build it with model.head = 'value' or 'classification'")
    squeeze = score.out_features == 1 and getattr(model, "head_kind", "value") == "value"

    def apply_head(hidden: torch.Tensor, output_weight: torch.Tensor) -> torch.Tensor:
        out = score(hidden)
        return out.squeeze(-1) if squeeze else out

    return apply_head


def last_token_mask(document_ids: torch.Tensor | None, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """[B, S] bool: True at the last token of every document (document_ids < 0 is padding; None: one
    document per row, ending at the last column)."""
    if document_ids is None:
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[:, -1] = True
        return mask
    nxt = torch.roll(document_ids, shifts=-1, dims=1)
    nxt[:, -1] = -2  # the row's end closes its last document
    return (document_ids >= 0) & (document_ids != nxt)


def last_token_scores(scores: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """One head output per document, read at its last token: [n_documents] (value) or [n_documents, labels],
    documents in row-major order."""
    mask = last_token_mask(document_ids, scores.shape[:2]).to(scores.device)
    return scores[mask]
