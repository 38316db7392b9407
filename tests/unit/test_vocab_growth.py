"""Vocabulary growth: checkpoint rows load into the first rows, added rows start at the checkpoint mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.models import build_model, get_model_spec, save_hf
from posttrain.models.sharded_load import load_hf_weights_sharded
from posttrain.models.vocab_growth import grown_vocab_size, init_new_vocab_rows


def test_grown_vocab_size_only_for_tokens_added_by_config() -> None:
    assert grown_vocab_size(1000, 900, 0) is None
    assert grown_vocab_size(1000, 1100, 100) == 1100
    assert grown_vocab_size(1000, 1000, 100) is None
    with pytest.raises(ValueError, match="tokenizer has 1100 tokens"):
        grown_vocab_size(1000, 1100, 50)


@pytest.mark.parametrize("tie", [True, False])
def test_grown_rows_are_the_mean_and_old_rows_are_kept(tmp_path: Path, tie: bool) -> None:
    torch.manual_seed(0)
    old = build_model("qwen3", "debug", device="cpu", vocab_size=150, tie_embeddings=tie)
    save_hf(old, tmp_path)
    spec = get_model_spec("qwen3")
    new_args = spec.args_cls(**{**old.args.__dict__, "vocab_size": 250})
    model = build_model("qwen3", new_args)  # meta, padded to 256
    model.to_empty(device="cpu")
    load_hf_weights_sharded(model, tmp_path, checkpoint_vocab_size=150)
    init_new_vocab_rows(model, tmp_path, spec, 150, 250)
    names = ["tok_embeddings"] + ([] if tie else ["output"])
    for name in names:
        w, w_old = getattr(model, name).weight, getattr(old, name).weight[:150]
        assert w.shape[0] == 256
        torch.testing.assert_close(w[:150], w_old)
        torch.testing.assert_close(w[150:250], w_old.mean(0).expand(100, -1), rtol=1e-6, atol=1e-6)
        assert w[250:].abs().sum() == 0  # padding rows
    ids = torch.tensor([[1, 2, 200, 249]])
    assert model(ids).shape == (1, 4, 250)
