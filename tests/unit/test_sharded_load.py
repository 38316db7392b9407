"""load_hf_weights_sharded / init_weights_sharded on one process (plain tensors = one shard covering all);
the checkpoint checks. The multi-rank cases are in tests/integration/test_fsdp_tp.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.models.hf import load_hf, save_hf
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import canonical_name, init_weights_sharded, load_hf_weights_sharded


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    save_hf(build_model("qwen3", "debug", device="cpu", vocab_size=2000), tmp_path / "hf")
    return tmp_path / "hf"


def empty_model(vocab_size: int = 2000, **kw) -> torch.nn.Module:
    model = build_model("qwen3", "debug", device="meta", vocab_size=vocab_size, **kw)
    model.to_empty(device="cpu")
    return model


def test_equals_load_hf_with_zeroed_vocab_padding(hf_dir):
    model = empty_model()
    load_hf_weights_sharded(model, hf_dir)
    ref = load_hf(hf_dir)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    assert model.tok_embeddings.weight[2000:].abs().sum() == 0
    assert model.output.weight is model.tok_embeddings.weight
    ids = torch.randint(0, 2000, (1, 8))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)


def test_checkpoint_mismatches_are_named(hf_dir):
    weights = load_file(hf_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:64]
    weights["model.extra_head.weight"] = torch.zeros(2)
    save_file(weights, hf_dir / "model.safetensors")
    with pytest.raises(KeyError) as err:
        load_hf_weights_sharded(empty_model(), hf_dir)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "q_proj.weight: checkpoint (64, 128), model (128, 128)" in msg
    assert "unexpected keys (1): model.extra_head.weight" in msg


def test_bigger_vocabulary_in_the_checkpoint_is_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(KeyError, match="embed_tokens.weight: checkpoint \\(2000, 128\\), model \\(1990, 128\\)"):
        load_hf_weights_sharded(empty_model(vocab_size=1990), hf_dir)
    assert config["vocab_size"] == 2000


def test_init_weights_sharded_on_one_process_equals_build_model():
    model = empty_model()
    init_weights_sharded(model, seed=11)
    torch.manual_seed(11)
    ref = build_model("qwen3", "debug", device="cpu", vocab_size=2000)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(model.rope.inv_freq, ref.rope.inv_freq)


def test_canonical_name_strips_wrappers():
    assert canonical_name("layers.0._checkpoint_wrapped_module.attention.wq.weight") == "layers.0.attention.wq.weight"
    assert canonical_name("_orig_mod.layers.1._orig_mod.norm.weight") == "layers.1.norm.weight"
