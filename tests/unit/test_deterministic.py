"""``training.deterministic``: the trainer switches torch's deterministic kernels, cuBLAS's workspace, cuDNN and
inductor to their reproducible settings and runs the fused losses' chunk math eagerly (the GPU tier's resume
test relies on it for bit-identical losses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config

from posttrain.config import load_config
from posttrain.deterministic import CUBLAS_WORKSPACE, use_deterministic_mode
from posttrain.losses import logit_math
from posttrain.trainer import Trainer


@pytest.fixture
def restore_global_state(monkeypatch):
    """Every switch is process-wide: put each back for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(logit_math, "compile_on_cuda", logit_math.compile_on_cuda)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    if hasattr(inductor_config, "deterministic"):
        monkeypatch.setattr(inductor_config, "deterministic", inductor_config.deterministic)
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_use_deterministic_mode_sets_every_switch(restore_global_state) -> None:
    use_deterministic_mode()
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not logit_math.compile_on_cuda
    assert getattr(inductor_config, "deterministic", True)


def test_a_users_cublas_setting_is_kept(restore_global_state, monkeypatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_mode()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_trainer_follows_the_config(restore_global_state, tmp_path: Path, deterministic: bool) -> None:
    cfg = load_config(["--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path),
                       "--metrics.tensorboard", "false", "--training.deterministic", str(deterministic).lower()])
    trainer = Trainer(cfg)
    try:
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        trainer.close()
