"""LoRA on stacked MoE experts under FSDP2 on two CPU ranks (gloo): Qwen3-MoE (with activation checkpointing)
and GPT-OSS give the single-process loss and adapter gradients, and export the same merged weights and PEFT
adapter from their sharded experts (see _lora_experts_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _reaped_runs import check_ok, run_side_by_side, torchrun

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_lora_experts_worker.py")


def test_expert_lora_under_fsdp_matches_single_process(tmp_path: Path) -> None:
    (result,) = run_side_by_side([torchrun(2, str(WORKER), str(tmp_path), "qwen3_moe", "gpt_oss")], timeout=180)
    check_ok(result)
    assert "ok lora experts qwen3_moe" in result.stdout and "ok lora experts gpt_oss" in result.stdout
