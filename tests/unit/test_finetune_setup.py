"""The config's LoRA / head / added-token settings applied by the trainer's model build."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.finetune_setup import add_config_modules, count_config_tokens
from posttrain.metrics import dense_flops_per_token
from posttrain.models import build_model
from posttrain.trainer import Trainer


def _cfg(tmp_path: Path, *extra: str):
    return load_config(["--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path),
                        "--metrics.tensorboard", "false", *extra])


def test_lora_and_value_head_leave_only_adapters_and_head_trainable(tmp_path: Path) -> None:
    model = build_model("qwen3", "debug")  # meta
    add_config_modules(model, _cfg(tmp_path, "--lora.rank", "4", "--model.head", "value"), tp_enabled=False)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "score.weight" in trainable
    assert all(n == "score.weight" or ".lora_" in n for n in trainable)


def test_tp_refuses_lora_dropout_and_bad_rank(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="lora.dropout = 0"):
        add_config_modules(build_model("qwen3", "debug"), _cfg(tmp_path, "--lora.rank", "4", "--lora.dropout", "0.1"),
                           tp_enabled=True)
    with pytest.raises(SystemExit, match="lora.rank"):
        add_config_modules(build_model("qwen3", "debug"), _cfg(tmp_path, "--lora.rank", "-1"), tp_enabled=False)


def test_count_config_tokens_counts_list_and_file(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("<a>\n\n <b> \n<c>\n")
    cfg = _cfg(tmp_path, "--tokenizer.add_special_tokens", '["<x>"]', "--tokenizer.add_tokens_file", str(tmp_path / "t.txt"))
    assert count_config_tokens(cfg.tokenizer) == 4


def test_mfu_counts_frozen_base_at_4_and_adapters_at_6_flops(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "--lora.rank", "4", "--lora.targets", '["wq", "wv"]'))
    try:
        trainable, frozen = trainer._param_counts()
        model = trainer.model
        adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        everything = sum(p.numel() for p in model.parameters())  # tied: the embedding counts as the head
        assert trainable == adapters and frozen == everything - adapters
        assert dense_flops_per_token(trainable, frozen) == 6 * adapters + 4 * (everything - adapters)
    finally:
        trainer.close()
