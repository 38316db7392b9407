"""compile.cudagraphs' gradient ownership: gradients leave the CUDA graphs' pool once and stay the trainer's own."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from posttrain.trainer import own_gradients


def test_own_gradients_copies_each_gradient_once_and_keeps_it_across_micro_batches() -> None:
    # compile.cudagraphs: the first gradient of a parameter is the graph pool's tensor; it must become a copy of
    # its own once, and later calls (every micro-batch, every step) must leave the owned tensor in place
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(4, 1))
    used = list(model[0].parameters()) + list(model[1].parameters())
    owned = WeakIdKeyDictionary()
    x = torch.randn(5, 4)
    model[1](model[0](x)).sum().backward()
    first = {id(p): p.grad for p in used}
    own_gradients(model.parameters(), owned)
    mine = {id(p): p.grad for p in used}
    assert all(mine[i] is not first[i] and torch.equal(mine[i], first[i]) for i in mine)
    assert model[2].weight.grad is None and model[2].weight not in owned  # never reached: no gradient
    model[1](model[0](x)).sum().backward()  # accumulates into the owned tensors
    own_gradients(model.parameters(), owned)
    for p in used:
        assert p.grad is mine[id(p)]
        torch.testing.assert_close(p.grad, 2 * first[id(p)])
    model.zero_grad(set_to_none=False)
    own_gradients(model.parameters(), owned)
    assert all(p.grad is mine[id(p)] and not p.grad.any() for p in used)
