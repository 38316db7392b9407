"""A tied embedding's lookup gradient as the looked-up rows (`models.common.embedding`), where that is the whole story.

A tied weight that trains, on one device (not a DTensor: FSDP / TP shards take dense gradients), in posttrain's
`Embedding`, looked up plainly (no `padding_idx`, `max_norm` or `scale_grad_by_freq`). autograd adds the rows into
the head's dense gradient; should the lookup's gradient arrive alone (a loss that does not use the tied head, e.g. a
reward head), a hook turns the weight's gradient dense once accumulated, so the optimizer, clipping and checkpoints
only ever see dense gradients.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from posttrain.models.common.embedding import Embedding

__all__ = ["use_sparse_embedding_grad"]

_hooked = WeakIdKeyDictionary()  # weights that have the densifying hook (by identity)


def use_sparse_embedding_grad(model: nn.Module) -> bool:
    """Switch `model.tok_embeddings` to row-sparse lookup gradients when its weight is the trained, unsharded, tied
    head weight `model.output.weight`; whether it is on."""
    embedding = getattr(model, "tok_embeddings", None)
    head = getattr(model, "output", None)
    if not isinstance(embedding, Embedding) or getattr(head, "weight", None) is not embedding.weight:
        return False
    weight = embedding.weight
    if (not weight.requires_grad or isinstance(weight, DTensor) or embedding.padding_idx is not None
            or embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse):
        return False
    if weight not in _hooked:
        weight.register_post_accumulate_grad_hook(_dense_grad)
        _hooked[weight] = True
    embedding.row_sparse_grad = True
    return True


def _dense_grad(weight: nn.Parameter) -> None:
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()
