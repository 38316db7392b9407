"""A tied embedding's lookup gradient as row-sparse (`parallelisms.sparse_embedding_grad`): the same dense gradient
as torch's dense embedding backward, through the fused and the chunked loss and over accumulated micro-batches; a
dense gradient even when the lookup's arrives alone; left alone where it does not apply."""

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
    assert use_sparse_embedding_grad(sparse) and sparse.tok_embeddings.sparse
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
    assert not use_sparse_embedding_grad(untied) and not untied.tok_embeddings.sparse
    _, frozen = _tied_pair()
    frozen.tok_embeddings.weight.requires_grad_(False)
    assert not use_sparse_embedding_grad(frozen) and not frozen.tok_embeddings.sparse
    _, twice = _tied_pair()
    assert use_sparse_embedding_grad(twice) and use_sparse_embedding_grad(twice)  # idempotent: one hook
    twice.tok_embeddings(torch.tensor([[1]])).sum().backward()
    assert not twice.tok_embeddings.weight.grad.is_sparse
