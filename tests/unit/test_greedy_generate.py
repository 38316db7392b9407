"""greedy_generate: argmax continuation, new tokens only, stops on (and returns) a stop token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.models.greedy import greedy_generate


class NextTokenModel(nn.Module):
    """Logits that make token (t + 1) % V the argmax after token t, ignoring everything earlier."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # greedy_generate reads the device from a parameter

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() + self.anchor


def test_returns_only_new_tokens() -> None:
    assert greedy_generate(NextTokenModel(), [5, 2], 4) == [3, 4, 5, 6]


def test_stops_after_a_stop_token() -> None:
    assert greedy_generate(NextTokenModel(), [1], 10, stop_ids=(4, 7)) == [2, 3, 4]


def test_zero_new_tokens_and_empty_prompt() -> None:
    assert greedy_generate(NextTokenModel(), [1], 0) == []
    with pytest.raises(ValueError, match="at least one prompt token"):
        greedy_generate(NextTokenModel(), [], 3)
