"""FLOP counting, memory helpers and the metrics logger (console, metrics.jsonl, TensorBoard)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.metrics import (
    MetricsLogger,
    attention_flops,
    dense_flops_per_token,
    device_peak_flops,
    document_lengths_from_ids,
    mfu_percent,
    peak_memory_gib,
    reset_peak_memory,
    training_flops,
)


def _cfg(log_freq=2, tensorboard=True, peak_tflops=None):
    return SimpleNamespace(log_freq=log_freq, tensorboard=tensorboard, peak_tflops=peak_tflops)


# --- FLOPs -----------------------------------------------------------------------------------------------


def test_attention_flops_of_packed_row_is_sum_over_its_documents():
    lengths = [100, 30, 2]
    kwargs = dict(n_layers=2, n_heads=4, head_dim=8)
    packed = attention_flops(lengths, **kwargs)
    assert packed == pytest.approx(sum(attention_flops([n], **kwargs) for n in lengths))
    assert packed < attention_flops([sum(lengths)], **kwargs)


def test_attention_flops_formula_causal_and_training_factors():
    L, layers, heads, hd = 64, 3, 2, 16
    forward_full = 2 * (2 * L * L * heads * hd) * layers
    assert attention_flops([L], layers, heads, hd, causal=False, training=False) == forward_full
    assert attention_flops([L], layers, heads, hd, causal=True, training=False) == forward_full / 2
    assert attention_flops([L], layers, heads, hd, causal=True, training=True) == 3 * forward_full / 2
    assert attention_flops(torch.tensor([L, L]), layers, heads, hd) == 2 * attention_flops([L], layers, heads, hd)


def test_document_lengths_from_document_ids_and_position_ids():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_lengths_from_ids(doc).tolist() == [3, 2, 1, 6]
    assert document_lengths_from_ids(None, pos).tolist() == [3, 2, 1, 6]
    assert document_lengths_from_ids(doc, pos).tolist() == [3, 2, 1, 6]
    # Same document id reused across rows, or two documents sharing an id but restarting positions.
    pos_restart = torch.tensor([[0, 1, 0, 1, 2, 3]])
    assert document_lengths_from_ids(torch.zeros(1, 6, dtype=torch.long), pos_restart).tolist() == [2, 4]
    # padding (-1) attends only to itself: it adds no document, wherever it sits
    padded = torch.tensor([[0, 0, 1, -1, -1, -1], [-1, 3, 3, 3, -1, -1]])
    assert document_lengths_from_ids(padded).tolist() == [2, 1, 3]
    assert document_lengths_from_ids(padded, torch.tensor([[0, 1, 0, 0, 1, 2], [0, 0, 1, 2, 0, 1]])).tolist() == [2, 1, 3]
    with pytest.raises(ValueError):
        document_lengths_from_ids(None, None)


def test_dense_and_training_flops():
    assert dense_flops_per_token(10) == 60
    assert dense_flops_per_token(10, n_frozen_params=100) == 460
    lengths = document_lengths_from_ids(torch.tensor([[0, 0, 1, 1]]))
    total = training_flops(4, n_trainable_params=10, document_lengths=lengths, n_layers=1, n_heads=1, head_dim=2)
    assert total == 4 * 60 + attention_flops([2, 2], 1, 1, 2)
    assert mfu_percent(50.0, 1.0, 100.0) == 50.0
    assert mfu_percent(50.0, 1.0, 25.0, n_devices=4) == 50.0
    assert mfu_percent(50.0, 1.0, None) is None


def test_device_peak_flops_override_and_cpu():
    assert device_peak_flops(torch.device("cpu"), None) is None
    assert device_peak_flops("cpu", 123e12) == 123e12
    with pytest.raises(ValueError, match="TFLOP"):
        device_peak_flops("cpu", 989.0)


def test_peak_memory_gib_cpu_is_positive():
    reset_peak_memory("cpu")
    assert peak_memory_gib(torch.device("cpu")) > 0


# --- Logger ----------------------------------------------------------------------------------------------


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_written_parseable_with_required_keys_and_null_for_nan(tmp_path, capsys):
    logger = MetricsLogger(_cfg(), tmp_path, rank=0, total_steps=10)
    logger.log(1, {"loss": 2.5, "lr": 1e-4, "grad_norm": float("nan"), "tokens_per_s": 1000.0,
                   "mfu": None, "mem_gib": torch.tensor(1.5), "data_wait_ms": 0.3, "extra/aux": 7})
    logger.log(2, {"loss": 2.0, "lr": 1e-4})
    logger.close()
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"):
        assert key in records[0] and key in records[1]
    assert records[0]["grad_norm"] is None and records[0]["mfu"] is None
    assert records[0]["mem_gib"] == 1.5 and records[0]["extra/aux"] == 7
    assert records[1]["tokens_per_s"] is None
    out = capsys.readouterr().out
    assert "step  1/10" in out and "loss 2.5000" in out and "tok/s 1,000" in out


def test_append_mode_and_truncate_after_on_resume(tmp_path):
    logger = MetricsLogger(_cfg(), tmp_path, rank=0, total_steps=10)
    for step in range(1, 7):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss"')  # a line cut off by a crash

    resumed = MetricsLogger(_cfg(), tmp_path, rank=0, total_steps=10)
    resumed.truncate_after(4)  # checkpoint was taken after step 4
    assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed.log(5, {"loss": 0.5})
    resumed.close()
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["loss"] == 0.5


def test_tensorboard_event_file_created(tmp_path):
    logger = MetricsLogger(_cfg(tensorboard=True), tmp_path, rank=0, total_steps=3)
    logger.log(1, {"loss": 1.0, "lr": 1e-3})
    logger.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0]


def test_tensorboard_off_and_nonzero_rank_write_nothing(tmp_path):
    MetricsLogger(_cfg(tensorboard=False), tmp_path / "a", rank=0, total_steps=3).close()
    assert not (tmp_path / "a" / "tb").exists()
    other = MetricsLogger(_cfg(), tmp_path / "b", rank=1, total_steps=3)
    other.log(1, {"loss": 1.0})
    other.truncate_after(0)
    other.close()
    assert not (tmp_path / "b").exists()


def test_should_log_first_every_freq_and_last():
    logger = MetricsLogger(_cfg(log_freq=5), "/nonexistent", rank=1, total_steps=12)
    assert [s for s in range(1, 13) if logger.should_log(s)] == [1, 5, 10, 12]


def test_logger_peak_flops_uses_config_tflops():
    logger = MetricsLogger(_cfg(peak_tflops=100.0), "/nonexistent", rank=1, total_steps=1)
    assert math.isclose(logger.peak_flops("cpu"), 100e12)
    assert MetricsLogger(_cfg(), "/nonexistent", rank=1, total_steps=1).peak_flops("cpu") is None


def test_console_shows_pair_metrics_and_evaluation_results(tmp_path, capsys):
    """A DPO step line carries its reward accuracy and margin; evaluation results (DPO's pair metrics, eval_loss,
    GRPO's eval_accuracy) reach the console when computed, not only metrics.jsonl."""
    logger = MetricsLogger(_cfg(tensorboard=False), tmp_path, rank=0, total_steps=40)
    logger.log(5, {"loss": 0.6, "lr": 1e-3, "reward_accuracy": 0.75, "reward_margin": 0.125, "chosen_logp": -9.0})
    logger.log(40, {"eval_loss": 0.7, "eval_reward_accuracy": 0.625, "eval_reward_margin": 0.05, "eval_pairs": 64})
    logger.log(40, {"eval_loss": 1.2345, "eval_tokens": 900})
    logger.log(20, {"loss": 0.1, "reward_mean": 0.66, "accuracy": 0.66, "eval_accuracy": 0.9})
    logger.close()
    step, dpo_eval, sft_eval, grpo = capsys.readouterr().out.splitlines()
    assert "reward_accuracy 0.7500" in step and "reward_margin 0.1250" in step and "chosen_logp" not in step
    assert "eval" in dpo_eval.split("|")[0] and "eval_reward_accuracy 0.6250" in dpo_eval
    assert "eval_reward_margin 0.0500" in dpo_eval
    assert "eval_loss 1.2345" in sft_eval
    assert "accuracy 0.6600" in grpo and "eval_accuracy 0.9000" in grpo
