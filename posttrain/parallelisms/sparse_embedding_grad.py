"""The tied embedding's own gradient as the rows the batch looked up, added into the head's dense gradient.

With tied input and output embeddings the one weight gets two gradients a step: the head's, dense `[V, D]`, and the
lookup's, nonzero only in the rows of the batch's token ids. torch's dense embedding backward zero-fills a `[V, D]`
buffer, sorts the ids and sums each id's rows into it, and autograd then adds that whole buffer into the head's
gradient: about 0.8 ms of a Llama-3.2-1B step at 8,192 tokens on an H200 (fills, sort, scatter, a 1.5 GB add;
the session-15 profile in BENCHMARKS.md) and a transient `[V, D]` buffer. With `nn.Embedding(sparse=True)` autograd
gets the looked-up rows alone (ids + `[tokens, D]` values) and adds them into the dense gradient in place.

Only where that is the whole story: a tied weight that trains, on one device (not a DTensor: FSDP / TP shards take
dense gradients). Should the lookup's gradient arrive first (a loss that does not use the tied head), a hook turns
the weight's gradient dense once accumulated, so the optimizer, clipping and checkpoints only ever see dense ones.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["use_sparse_embedding_grad"]


def use_sparse_embedding_grad(model: nn.Module) -> bool:
    """Switch `model.tok_embeddings` to row-sparse gradients when its weight is the trained, unsharded, tied head
    weight `model.output.weight`; whether it did."""
    embedding = getattr(model, "tok_embeddings", None)
    head = getattr(model, "output", None)
    if not isinstance(embedding, nn.Embedding) or getattr(head, "weight", None) is not embedding.weight:
        return False
    weight = embedding.weight
    if not weight.requires_grad or isinstance(weight, DTensor) or embedding.max_norm is not None:
        return False
    if not embedding.sparse:
        embedding.sparse = True
        weight.register_post_accumulate_grad_hook(_dense_grad)
    return True


def _dense_grad(weight: nn.Parameter) -> None:
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()
