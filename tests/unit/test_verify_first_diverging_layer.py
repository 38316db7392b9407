"""verify_hf_parity.py names the first layer where a (deliberately broken) port diverges from transformers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models import load_hf

REPO = Path(__file__).resolve().parents[2]


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


verify = _load_verifier()
TOL, RTOL = verify.DEFAULT_TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return verify.make_random_hf_model("llama", tmp_path_factory.mktemp("llama"))


def _break_layer_weight(model: torch.nn.Module, layer: int) -> None:
    with torch.no_grad():
        model.layers[str(layer)].feed_forward.w2.weight.mul_(1.01)


def _break_rope_theta(model: torch.nn.Module) -> None:
    model.rope.rope_theta *= 2
    model.rope.init_buffers()


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda m: _break_layer_weight(m, 1), "layer 1"),
        (_break_rope_theta, "layer 0"),  # every layer uses RoPE: the first already diverges
    ],
    ids=["layer1-weight", "rope-theta"],
)
def test_broken_port_reports_its_first_diverging_layer(llama_dir: Path, breakage, expected: str) -> None:
    ours = load_hf(llama_dir)
    breakage(ours)
    report = verify.compare_logits(llama_dir, ours=ours, seq_len=32)
    assert report.max_abs > TOL + RTOL * report.ref_max_abs  # the logits fail, as they should
    first = report.first_divergence(TOL, RTOL)
    assert first is not None and first.name == expected, [(d.name, d.max_abs) for d in report.layers]
    names = [d.name for d in report.layers]
    assert all(d.max_abs == 0.0 for d in report.layers[: names.index(expected)])  # everything before matches


def test_intact_port_has_no_diverging_layer(llama_dir: Path) -> None:
    report = verify.compare_logits(llama_dir, seq_len=32)
    assert [d.name for d in report.layers] == ["embeddings", "layer 0", "layer 1", "final norm"]
    assert report.first_divergence(TOL, RTOL) is None


def test_cli_prints_the_first_diverging_layer_and_exits_1(llama_dir: Path, monkeypatch, capsys) -> None:
    import posttrain.models

    def broken_load_hf(*args, **kwargs):
        model = load_hf(*args, **kwargs)
        _break_layer_weight(model, 1)
        return model

    monkeypatch.setattr(posttrain.models, "load_hf", broken_load_hf)
    assert verify.main(["--hf-dir", str(llama_dir), "--seq-len", "32"]) == 1
    out = capsys.readouterr().out
    assert "first diverging layer: layer 1" in out and "FAIL" in out
