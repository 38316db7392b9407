"""Gemma 3 (text) against transformers: random tiny configs with awkward shapes (sliding window shorter than
the documents, linear-scaled global RoPE, query_pre_attn_scalar != head_dim), save_hf round trip, flavors."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models import build_model, get_model_spec, load_hf, save_hf

REPO = Path(__file__).resolve().parents[2]


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


verify = _load_verifier()


@pytest.fixture(scope="module")
def random_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return verify.make_random_hf_model("gemma3_text", tmp_path_factory.mktemp("gemma3"))


@pytest.mark.parametrize("attn_backend", ["sdpa", "flex"])
def test_gemma3_logits_match_transformers(random_gemma3: Path, attn_backend: str) -> None:
    report = verify.compare_logits(random_gemma3, dtype=torch.float32, seq_len=40, batch=2, attn_backend=attn_backend)
    assert report.rel < 1e-5, report


def test_gemma3_sliding_window_changes_logits(random_gemma3: Path) -> None:
    ids = torch.randint(0, 1000, (1, 30))
    with torch.no_grad():
        windowed = load_hf(random_gemma3)(ids)
        unwindowed = load_hf(random_gemma3, sliding_window=1000)(ids)
    window = load_hf(random_gemma3).args.sliding_window
    assert torch.allclose(windowed[:, :window], unwindowed[:, :window], atol=1e-5)  # within the window: same
    assert (windowed[:, window:] - unwindowed[:, window:]).abs().max() > 1e-2


def test_gemma3_save_hf_round_trips_through_transformers(random_gemma3: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load_hf(random_gemma3).eval()
    save_hf(ours, tmp_path / "out")
    assert load_hf(tmp_path / "out").args == ours.args
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("flavor", ["1B", "4B", "12B", "27B"])
def test_gemma3_flavor_config_round_trips(flavor: str) -> None:
    from transformers import Gemma3TextConfig

    spec = get_model_spec("gemma3")
    args = spec.flavors[flavor]
    config = spec.hf_config_from_args(args)
    hf = Gemma3TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    assert hf.layer_types.count("full_attention") == args.n_layers // 6
    assert spec.args_from_hf_config(hf.to_dict()) == args
    assert spec.args_from_hf_config(config) == args


def test_gemma3_debug_flavor_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_model("gemma3", "debug", "cpu")
    ids = torch.randint(0, model.args.vocab_size, (2, 40))
    document_ids = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    position_ids = torch.cat([torch.arange(25), torch.arange(15)]).unsqueeze(0)
    position_ids = torch.cat([position_ids, torch.arange(40).unsqueeze(0)])
    logits = model(ids, position_ids=position_ids, document_ids=document_ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.output.weight is model.tok_embeddings.weight
    assert dataclasses.asdict(model.args)["layer_types"].count("full_attention") == 1
