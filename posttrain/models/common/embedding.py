"""Token embedding whose weight's gradient can be handed to autograd as the rows the batch looked up.

With tied input and output embeddings the one weight gets two gradients a step: the head's, dense `[V, D]`, and
the lookup's, nonzero only in the rows of the batch's ids. torch's dense embedding backward zero-fills a `[V, D]`
buffer, sums each id's rows into it and autograd then adds the whole buffer into the head's gradient (read two
`[V, D]`, write one): about 0.8 ms of a Llama-3.2-1B step at 8,192 tokens on an H200 (the session-15 profile,
BENCHMARKS.md). With `row_sparse_grad` the lookup's gradient is a sparse `[V, D]` tensor of N rows (N = the ids
looked up): each distinct id's rows summed by torch's own dense embedding backward over the batch's compact id
space (`[N, D]` instead of `[V, D]`: the same kernel and summation as the dense path), then autograd adds it to the
head's gradient with one add per id. autograd does not add a sparse gradient in place: the sum is a new dense
tensor, the head's gradient copied plus the rows (one `[V, D]` read and one write instead of a fill and a
three-tensor add; the same peak memory). Fixed sizes throughout (no count of distinct ids leaves the device, so no
host sync); the rows past the distinct ids are zero and point at row 0 (adding zero is exact in any order), so the
result equals the dense path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Embedding", "row_sparse_embedding_grad"]


def row_sparse_embedding_grad(ids: Tensor, grad_out: Tensor, num_embeddings: int) -> Tensor:
    """d loss / d weight of `F.embedding(ids, weight)` as a sparse COO tensor (uncoalesced, N rows)."""
    flat = ids.reshape(-1).long()  # F.embedding takes int32 ids; the index arithmetic below needs int64
    n = flat.numel()
    dim = grad_out.shape[-1]
    sorted_ids, order = torch.sort(flat)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = torch.cumsum(first, 0) - 1  # the rank of each sorted id among the distinct ones
    compact = torch.empty_like(flat)
    compact[order] = segment  # each looked-up position's distinct-id rank, in the batch's order
    segment_id = torch.zeros_like(flat).scatter_(0, segment, sorted_ids)  # rank -> vocabulary id (unused: 0)
    rows = torch.ops.aten.embedding_dense_backward(grad_out.reshape(n, dim), compact, n, -1, False)
    return torch.sparse_coo_tensor(segment_id[None], rows, (num_embeddings, dim), check_invariants=False)


class _RowSparseGradEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        return None, row_sparse_embedding_grad(ids, grad_out, ctx.num_embeddings)


class Embedding(nn.Embedding):
    """`nn.Embedding`; with `row_sparse_grad` (set by `parallelisms.sparse_embedding_grad`) the weight's gradient
    from this lookup is the looked-up rows (module docstring). The forward is the same lookup either way."""

    row_sparse_grad = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's own argument name
        if self.row_sparse_grad and self.weight.requires_grad and torch.is_grad_enabled():
            return _RowSparseGradEmbedding.apply(input, self.weight)
        return super().forward(input)
