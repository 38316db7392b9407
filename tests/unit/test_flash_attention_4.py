"""model.sdpa_kernel = "fa4": where FlashAttention-4 cannot run, the refusal is one line naming the key and why.
(The kernels themselves run on the GPU tier: tests/gpu/test_cuda_flash_attention_4.py.)"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import config_from_dict
from posttrain.models import build_model
from posttrain.models.common.attention import SDPA_KERNELS
from posttrain.models.common.flash_attention_4 import FlashAttention4Unavailable, fa4_unavailable_reason
from posttrain.parallelisms import ParallelDims
from posttrain.trainer import build_training_model


def _build(model: dict) -> str:
    cfg = config_from_dict({"model": {"name": "llama3", "flavor": "debug", "dtype": "float32", **model}})
    with pytest.raises(SystemExit) as exit_:
        build_training_model(cfg, parallel_dims=ParallelDims(1, 1, 1, world_size=1), device=torch.device("cpu"),
                             mixed_precision="fp32", tokenizer_vocab_size=2048)
    return str(exit_.value.code)


def test_fa4_pins_sdpa_to_its_flash_entry() -> None:
    assert SDPA_KERNELS["fa4"] is torch.nn.attention.SDPBackend.FLASH_ATTENTION


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_building_an_fa4_model_is_refused_with_the_reason() -> None:
    reason = fa4_unavailable_reason()
    assert reason is not None and "\n" not in reason
    with pytest.raises(FlashAttention4Unavailable, match="CUDA|torch"):
        build_model("llama3", "debug", device="cpu", attn_backend="sdpa", sdpa_kernel="fa4")
    message = _build({"attn_backend": "sdpa", "sdpa_kernel": "fa4"})
    assert message == f"model.sdpa_kernel = 'fa4': {reason}"


def test_fa4_with_flex_attention_is_refused_naming_both_keys() -> None:
    message = _build({"attn_backend": "flex", "sdpa_kernel": "fa4"})
    assert message.startswith("model.sdpa_kernel = 'fa4' needs model.attn_backend = 'sdpa'") and "\n" not in message


def test_flash_attn_2_alone_is_not_taken_for_fa4(tmp_path, monkeypatch) -> None:
    """flash-attn 2 installs a `flash_attn` package too; FA4 is its `cute` subpackage. (The GPU checks come first,
    so a Hopper GPU is what the machine reports here.)"""
    if "FA4" not in getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])():
        pytest.skip(f"torch {torch.__version__} has no FA4 entry")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "without FA4's cute kernels" in fa4_unavailable_reason()
    (tmp_path / "flash_attn" / "cute").mkdir()
    assert fa4_unavailable_reason() is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 9.x or 10.x" in fa4_unavailable_reason()


def test_the_hf_backend_refuses_a_pinned_kernel() -> None:
    message = _build({"backend": "hf", "hf_path": "unused", "sdpa_kernel": "fa4"})
    assert message.startswith("model.sdpa_kernel = 'fa4' applies to posttrain's own models") and "\n" not in message
