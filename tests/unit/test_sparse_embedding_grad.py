"""A tied embedding's lookup gradient as the looked-up rows (`models.common.embedding`, switched on by
`parallelisms.sparse_embedding_grad`): the same dense gradient as torch's dense embedding backward, through the fused
and the chunked loss and over accumulated micro-batches, bit for bit in bf16 with a token repeated hundreds of times
(the same per-id sums, rounded once, then one add per id); a dense gradient even when the lookup's arrives alone; left
alone where it does not apply."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from posttrain.losses import cross_entropy_for
from posttrain.models.registry import build_model
from posttrain.parallelisms.sparse_embedding_grad import use_sparse_embedding_grad


def _tied_pair(**overrides):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("llama3", "debug", "cpu", tie_embeddings=True, vocab_size=512, **overrides))
    assert models[0].output.weight is models[0].tok_embeddings.weight
    return models


def _loss(model, ids, impl):
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    output_fn = partial(cross_entropy_for(impl), labels=labels, vocab_size=model.args.vocab_size, chunk_size=0)
    loss_sum, _ = model(ids, output_fn=output_fn)
    return loss_sum


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_row_sparse_lookup_gradient_equals_the_dense_one(impl: str) -> None:
    dense, sparse = _tied_pair()
    assert use_sparse_embedding_grad(sparse) and sparse.tok_embeddings.row_sparse_grad
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two micro-batches accumulate into .grad
        ids = torch.randint(0, 512, (2, 24), generator=g)
        for model in (dense, sparse):
            _loss(model, ids, impl).backward()
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert not q.grad.is_sparse, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_lookup_gradient_that_arrives_alone_is_made_dense() -> None:
    _, model = _tied_pair()
    assert use_sparse_embedding_grad(model)
    ids = torch.tensor([[3, 5, 5, 7]])
    model.tok_embeddings(ids).square().sum().backward()  # a loss that never uses the head
    grad = model.tok_embeddings.weight.grad
    assert not grad.is_sparse and grad.shape == model.tok_embeddings.weight.shape
    touched = grad.abs().sum(dim=1).nonzero().squeeze(1).tolist()
    assert touched == [3, 5, 7]
    expected = 2 * model.tok_embeddings.weight.detach()[5] * 2  # two lookups of row 5, d(x^2) = 2x each
    torch.testing.assert_close(grad[5], expected)


def test_left_alone_where_it_does_not_apply() -> None:
    untied = build_model("llama3", "debug", "cpu", tie_embeddings=False, vocab_size=512)
    assert not use_sparse_embedding_grad(untied) and not untied.tok_embeddings.row_sparse_grad
    _, frozen = _tied_pair()
    frozen.tok_embeddings.weight.requires_grad_(False)
    assert not use_sparse_embedding_grad(frozen) and not frozen.tok_embeddings.row_sparse_grad
    _, twice = _tied_pair()
    assert use_sparse_embedding_grad(twice) and use_sparse_embedding_grad(twice)  # idempotent: one hook
    twice.tok_embeddings(torch.tensor([[1]])).sum().backward()
    assert not twice.tok_embeddings.weight.grad.is_sparse


def test_bf16_with_a_frequent_token_equals_the_dense_path_bit_for_bit() -> None:
    """Each id's rows are summed first and added once: no per-occurrence bf16 rounding of a running row total."""
    dense, sparse = (m.to(torch.bfloat16) for m in _tied_pair())
    assert use_sparse_embedding_grad(sparse)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, 512), generator=g)
    ids[:, ::2] = 7  # half the batch is one token
    for model in (dense, sparse):
        _loss(model, ids, "fused").backward()
    assert torch.equal(sparse.tok_embeddings.weight.grad, dense.tok_embeddings.weight.grad)


def test_the_gradient_is_sync_free_fixed_size_and_exact() -> None:
    from posttrain.models.common.embedding import row_sparse_embedding_grad

    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([[5, 3, 5, 9], [3, 3, 0, 5]])
    grad_out = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    grad = row_sparse_embedding_grad(ids, grad_out, 12)
    assert grad.is_sparse and grad.shape == (12, 6) and grad._nnz() == ids.numel()  # fixed size: no distinct-id count
    want = torch.zeros(12, 6, dtype=torch.float64).index_add_(0, ids.reshape(-1), grad_out.reshape(-1, 6))
    torch.testing.assert_close(grad.to_dense(), want, rtol=0, atol=1e-15)


def test_a_deep_copy_gets_its_own_hook() -> None:
    import copy

    _, model = _tied_pair()
    assert use_sparse_embedding_grad(model)
    twin = copy.deepcopy(model)  # keeps row_sparse_grad, not the hook
    assert use_sparse_embedding_grad(twin)
    twin.tok_embeddings(torch.tensor([[1, 2]])).sum().backward()
    assert not twin.tok_embeddings.weight.grad.is_sparse


def test_int32_ids() -> None:
    dense, sparse = _tied_pair()
    assert use_sparse_embedding_grad(sparse)
    ids = torch.tensor([[3, 5, 5, 7]], dtype=torch.int32)
    for model in (dense, sparse):
        model.tok_embeddings(ids).square().sum().backward()
    torch.testing.assert_close(sparse.tok_embeddings.weight.grad, dense.tok_embeddings.weight.grad)
