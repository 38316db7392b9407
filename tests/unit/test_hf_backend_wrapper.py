"""The Hugging Face fallback backend's model wrapper: packed rows, chunked loss, load / save, refusals."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import chunked_cross_entropy
from posttrain.models.hf_backend import (
    HFCausalLM,
    build_hf_causal_lm,
    init_hf_backend_weights,
    load_hf_backend_weights,
)

VOCAB = 2048


def mistral_config(**kw):
    from transformers import MistralConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return MistralConfig(**{**base, **kw})


def phi3_config(**kw):
    from transformers import Phi3Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Phi3Config(**{**base, **kw})


def _random_model(config, seed: int = 0) -> HFCausalLM:
    model = build_hf_causal_lm(config)  # parameters on meta, RoPE buffers real
    model.to_empty(device="cpu")
    init_hf_backend_weights(model, seed)
    return model.eval()


def _packed_row(lengths: list[int], pad: int):
    """position ids restarting per document, document ids, padding counted as one more (position) document."""
    pos = [torch.arange(n) for n in lengths] + [torch.arange(pad)]
    docs = [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)]
    return torch.cat(pos).unsqueeze(0), torch.cat(docs).unsqueeze(0)


@pytest.mark.parametrize("make_config", [mistral_config, phi3_config], ids=["mistral", "phi3"])
@torch.no_grad()
def test_packed_row_equals_each_document_alone(make_config) -> None:
    model = _random_model(make_config())
    lengths, pad = [11, 1, 17, 9], 5
    position_ids, document_ids = _packed_row(lengths, pad)
    ids = torch.randint(3, VOCAB, (1, sum(lengths) + pad), generator=torch.Generator().manual_seed(1))
    packed = model(ids, position_ids=position_ids, document_ids=document_ids)
    alone = torch.cat([model(doc) for doc in ids[:, : sum(lengths)].split(lengths, dim=1)], dim=1)
    assert packed.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(packed[:, : sum(lengths)], alone, rtol=1e-5, atol=1e-5)
    # without the restarting position ids the documents would see each other: the check has teeth
    unpacked = model(ids)
    assert (unpacked[:, : sum(lengths)] - alone).abs().max() > 1e-2


@torch.no_grad()
def test_chunked_loss_on_last_hidden_state_equals_transformers_loss() -> None:
    model = _random_model(mistral_config())
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    loss_sum, n = model(ids, output_fn=partial(chunked_cross_entropy, labels=labels, vocab_size=VOCAB, chunk_size=7))
    logits = model.hf_model(input_ids=ids, use_cache=False).logits
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert int(n) == int((labels != -100).sum())
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make_config", [mistral_config, phi3_config], ids=["mistral-untied", "phi3-tied"])
@torch.no_grad()
def test_load_then_save_round_trips_through_transformers(make_config, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(make_config()).eval()
    reference.save_pretrained(tmp_path / "in")
    model = build_hf_causal_lm(reference.config)
    model.to_empty(device="cpu")
    load_hf_backend_weights(model, tmp_path / "in")  # RoPE buffers must survive to_empty for this to match
    model.eval()
    if reference.config.tie_word_embeddings:
        assert model.output_weight is model.decoder.get_input_embeddings().weight
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = reference(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        model.decoder.norm.weight.mul_(1.5)  # a change the export must carry
    model.save_hf(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert saved == set(reference.state_dict()) - tied  # HF names, each once
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(reference)
    torch.testing.assert_close(exported(input_ids=ids, use_cache=False).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_args_and_mfu_availability() -> None:
    model = build_hf_causal_lm(mistral_config(sliding_window=64))
    a = model.args
    assert (a.model_type, a.vocab_size, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == (
        "mistral", VOCAB, 64, 2, 4, 2, 16)
    assert a.padded_vocab_size == VOCAB and not a.tie_embeddings
    assert len(model.layers) == 2 and model.supports_packed_documents
    assert model.mfu_unavailable_reason(64) is None
    assert "sliding-window" in model.mfu_unavailable_reason(128)
    assert build_hf_causal_lm(phi3_config()).mfu_unavailable_reason(4096) is None


def test_logit_softcapping_model_is_refused() -> None:
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        build_hf_causal_lm(config)


def test_tensor_parallel_and_flex_are_refused_at_start() -> None:
    from posttrain.config.sections import ModelSection
    from posttrain.parallelisms import ParallelDims
    from posttrain.parallelisms.hf_parallelize import _attn_implementation, parallelize_hf

    model = build_hf_causal_lm(mistral_config())
    with pytest.raises(SystemExit, match="parallelism.tp"):
        parallelize_hf(model, ParallelDims(dp_replicate=1, dp_shard=1, tp=2, world_size=2))
    with pytest.raises(SystemExit, match="attn_backend = 'flex'"):
        _attn_implementation(ModelSection(backend="hf", attn_backend="flex").attn_backend)


def test_native_loader_names_the_unsupported_model_type(tmp_path: Path) -> None:
    from posttrain.models import load_hf

    mistral_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'mistral'.*model\.backend = \"hf\""):
        load_hf(tmp_path)
