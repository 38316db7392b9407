"""Distillation refuses a teacher whose tokenizer differs from the student's, saying what differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.recipes.distill import check_same_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


def test_same_tokenizer_passes() -> None:
    check_same_tokenizer(HFTokenizer(TOKENIZER), HFTokenizer(TOKENIZER))


def test_grown_vocabulary_is_refused_with_the_sizes() -> None:
    with pytest.raises(SystemExit, match="share one tokenizer.*vocabulary sizes"):
        check_same_tokenizer(HFTokenizer(TOKENIZER), HFTokenizer(TOKENIZER, add_special_tokens=["<|extra|>"]))
