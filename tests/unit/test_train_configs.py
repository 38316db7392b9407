"""Every shipped file in train_configs/ loads and passes validation (the same loader `train.py` uses), and a
GRPO config also passes the GRPO controller's own checks: a shipped config can never fail to load again."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config.loader import parse_config
from posttrain.rl.controller import check_grpo_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "train_configs").glob("*.toml"))


def test_there_are_configs_to_check() -> None:
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = parse_config(["--config", str(path)])
    if cfg.job.recipe == "grpo":
        check_grpo_config(cfg)
