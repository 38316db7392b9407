"""posttrain vs transformers on the same checkpoints: load_hf, save_hf (single / sharded / DTensor) and the
verify_hf_parity script's own functions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.models import build_model, load_hf, save_hf

REPO = Path(__file__).resolve().parents[2]


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


verify = _load_verifier()


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_random_hf_model_logits_match_transformers(model_type: str, tmp_path: Path) -> None:
    folder = verify.make_random_hf_model(model_type, tmp_path)
    report = verify.compare_logits(folder, dtype=torch.float32, seq_len=48, batch=2)
    assert report.rel < 1e-5, report


def test_verifier_cli_exits_nonzero_above_tolerance(tmp_path: Path) -> None:
    common = ["--model-type", "qwen3", "--random", "--out-dir", str(tmp_path), "--seq-len", "12", "--batch", "1"]
    assert verify.main(common) == 0
    assert verify.main([*common, "--tol", "-1", "--rtol", "0"]) == 1


def test_save_hf_tied_round_trip_loads_in_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("qwen3", "debug", "cpu", vocab_size=1000)  # tied, padded vocab 1024
    _randomize_norms(model)

    class Tokenizer:
        def save(self, out_dir: str) -> None:
            (Path(out_dir) / "tokenizer.json").write_text("{}")

    save_hf(model, tmp_path, tokenizer=Tokenizer())
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "generation_config.json").is_file() or model.args.eos_token_id is None
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] and config["vocab_size"] == 1000
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in weights and weights["model.embed_tokens.weight"].shape == (1000, 128)

    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        ours = model(ids)
        assert _rel_err(ours, _hf_logits(tmp_path, ids)) < 1e-5
        reloaded = load_hf(tmp_path)
        assert reloaded.output.weight is reloaded.tok_embeddings.weight
        torch.testing.assert_close(reloaded(ids), ours, rtol=0, atol=0)


def test_sharded_save_loads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("llama3", "debug", "cpu", vocab_size=1000)  # untied
    _randomize_norms(model)
    save_hf(model, tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert "lm_head.weight" in index["weight_map"]

    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        ours = model(ids)
        assert _rel_err(ours, _hf_logits(tmp_path, ids)) < 1e-5
        torch.testing.assert_close(load_hf(tmp_path)(ids), ours, rtol=0, atol=0)


def test_load_hf_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    save_hf(build_model("llama3", "debug", "cpu"), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError) as err:
        load_hf(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.mlp.extra_proj.weight" in str(err.value)


def test_save_hf_gathers_fsdp_dtensor_params(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = build_model("qwen3", "debug", "cpu", vocab_size=1000)
    model = build_model("qwen3", "debug", "cpu", vocab_size=1000)
    model.load_state_dict(reference.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg_store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.layers["0"].attention.wq.weight).__name__ == "DTensor"
        save_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    reloaded = load_hf(tmp_path / "hf")
    for name, param in reference.state_dict().items():
        expected = param[:1000] if name in ("tok_embeddings.weight", "output.weight") else param
        got = reloaded.state_dict()[name][: expected.shape[0]]
        torch.testing.assert_close(got, expected.to(torch.bfloat16).float(), rtol=0, atol=0)
