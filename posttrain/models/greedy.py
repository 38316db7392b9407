"""A reference greedy decoder for tests and small evals.

Every step re-runs the model on the whole sequence (no KV cache), so it is O(n^2) in the generated length and
only meant for short generations: its value is that it is obviously correct, which makes it the yardstick for
faster engines (the KV-cache engine, posttrain.inference.native) and for parity checks against
``transformers``' generate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(
    model: nn.Module, input_ids: list[int], max_new_tokens: int, stop_ids: Iterable[int] = ()
) -> list[int]:
    """The argmax continuation of ``input_ids`` (new tokens only, a stop token included when hit).

    ``model(ids [1, S])`` must return logits ``[1, S, V]``, as every posttrain model does.
    """
    if not input_ids:
        raise ValueError("greedy_generate needs at least one prompt token")
    stop = set(stop_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(ids)[0, -1].argmax())
        new_tokens.append(next_id)
        if next_id in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
    return new_tokens
