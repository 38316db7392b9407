"""GPT-OSS parallelizes like Qwen3-MoE: FSDP on the expert dimension, AC, compile; no TP / expert parallelism yet."""

from posttrain.models.qwen3_moe.parallelize import parallelize, tp_plan

__all__ = ["parallelize", "tp_plan"]
