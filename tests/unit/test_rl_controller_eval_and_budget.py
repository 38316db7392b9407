"""The controller's held-out accuracy per task and its wall-clock budget rule (grpo.time_budget_s)."""

from __future__ import annotations

import torch

from posttrain.rl.controller import accuracy_by_task, out_of_time


def test_accuracy_by_task_splits_the_correct_completions_by_the_samples_task() -> None:
    samples = [{"task": "products"}, {"task": "chain_sum"}, {"task": "products"}, {"task": "chain_sum"},
               {"task": "products"}]
    correct = torch.tensor([True, False, False, True, True])
    assert accuracy_by_task(correct, samples, "eval_accuracy") == {
        "eval_accuracy/chain_sum": 0.5, "eval_accuracy/products": 2 / 3}


def test_accuracy_by_task_is_empty_for_one_task_or_none() -> None:
    correct = torch.tensor([True, False])
    assert accuracy_by_task(correct, [{"task": "a"}, {"task": "a"}], "eval_accuracy") == {}
    assert accuracy_by_task(correct, [{}, {}], "eval_accuracy") == {}


def test_out_of_time_judges_the_next_step_by_the_slowest_of_the_last_three() -> None:
    assert not out_of_time(100.0, [5.0, 5.0], budget_s=0)  # no budget
    assert not out_of_time(100.0, [], budget_s=50)  # no step measured yet: the first step always runs
    assert not out_of_time(90.0, [30.0, 5.0, 5.0, 5.0], budget_s=100)  # the slow first step has aged out
    assert out_of_time(90.0, [30.0, 5.0, 11.0, 5.0], budget_s=100)  # 90 + 11 > 100
    assert out_of_time(96.0, [5.0], budget_s=100)
