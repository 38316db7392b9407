"""Swappable output heads: value and classification heads on the model, called through output_fn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models import build_model, save_hf
from posttrain.models.common.heads import (
    attach_head,
    get_head,
    head_output_fn,
    init_head,
    last_token_mask,
    last_token_scores,
)


def _model():
    torch.manual_seed(0)
    return build_model("qwen3", "debug", device="cpu", vocab_size=300)


def test_lm_head_attaches_nothing_and_logits_are_unchanged() -> None:
    model = _model()
    ids = torch.randint(0, 300, (2, 9))
    before = model(ids)
    assert attach_head(model, "lm") is None and get_head(model) is None
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown head"):
        attach_head(model, "reward")


def test_value_and_classification_heads_shapes_and_gradients() -> None:
    ids = torch.randint(0, 300, (2, 9))
    value_model = _model()
    attach_head(value_model, "value")
    init_head(value_model, seed=0)
    values = value_model(ids, output_fn=head_output_fn(value_model))
    assert values.shape == (2, 9)
    values.sum().backward()
    assert value_model.score.weight.grad is not None

    cls_model = _model()
    attach_head(cls_model, "classification", num_labels=5)
    init_head(cls_model, seed=0)
    assert cls_model(ids, output_fn=head_output_fn(cls_model)).shape == (2, 9, 5)
    with pytest.raises(ValueError, match="num_labels"):
        attach_head(_model(), "classification", num_labels=1)


def test_last_token_scores_pick_each_packed_document_end() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    scores = torch.arange(12.0).view(2, 6)
    assert last_token_mask(doc_ids, doc_ids.shape).nonzero().tolist() == [[0, 1], [0, 4], [1, 5]]
    assert last_token_scores(scores, doc_ids).tolist() == [1.0, 4.0, 11.0]
    assert last_token_scores(scores, None).tolist() == [5.0, 11.0]


def test_value_head_exports_as_sequence_classification(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = _model()
    attach_head(model, "value")
    init_head(model, seed=0)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        ours = model(ids, output_fn=head_output_fn(model))[0, -1]
    save_hf(model, tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert hf.config.num_labels == 1
    with torch.no_grad():
        theirs = hf(ids).logits[0, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
