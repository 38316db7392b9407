"""The math demo's answer extraction, its built-in copy of reasoning-gym's scorers, and its worked solutions."""

from __future__ import annotations

import random

import pytest

from _scripts import load_script



eval_math = load_script("eval_math")
make_math_data = load_script("make_math_data")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("12 + 7\n= 19\nThe answer is 19.", "19"),
        ("-59 * 21 + 3\n= -1239 + 3\n= -1236\nThe answer is -1236.", "-1236"),
        ("So, the answer is **1,776**.", "1776"),
        ("Answer: 42", "42"),
        ("<answer> -7 </answer> and later 99", "-7"),
        ("first 3 then 4 and finally 5.", "5"),
        ("2.5 is the result", "2.5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer_follows_the_documented_rules(completion, expected):
    assert eval_math.extract_answer(completion) == expected


def _candidate_answers(oracle: str, rng: random.Random) -> list[str | None]:
    value = int(oracle)
    fixed = [oracle, f"+{oracle}" if value >= 0 else oracle, f"0{abs(value)}", f"{oracle}.0", f"{oracle}.00",
             f"{value:,}", f" {oracle} ", str(-value), str(value + 1), str(value * 10), oracle + "0", "1" + oracle,
             f"{oracle}.", f"{oracle}.5", "", None, "abc", "NaN", "sNaN", "Infinity", "1e1", "1_0",
             f"x = {oracle}", f"{oracle} apples"]
    return fixed + [str(value + rng.randint(-20, 20)) for _ in range(4)]


def test_builtin_scorer_matches_reasoning_gym():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    rng = random.Random(0)
    compared = 0
    for k, task in enumerate(make_math_data.TASKS):
        dataset = reasoning_gym.create_dataset(task.name, seed=123 + k, size=12, **task.config)
        rg_score = reasoning_gym.get_score_answer_fn(task.name)
        for i in range(len(dataset)):
            entry = dataset[i]
            row = {"task": task.name, "scorer": task.scorer, "entry": make_math_data._json_safe(entry)}
            for answer in _candidate_answers(entry["answer"], rng):
                assert eval_math.builtin_score(answer, row) == rg_score(answer, entry), (task.name, answer, entry)
                compared += 1
    assert compared >= 300


def test_worked_solutions_reach_reasoning_gyms_answer():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    for k, task in enumerate(make_math_data.TASKS):
        dataset = reasoning_gym.create_dataset(task.name, seed=7 + k, size=300, **task.config)
        for i in range(len(dataset)):
            entry = dataset[i]
            reply, value = make_math_data.worked_solution(entry["metadata"]["expression"])
            assert str(value) == entry["answer"] and reply.endswith(f"The answer is {entry['answer']}.")


def test_worked_solution_shows_each_step():
    reply, value = make_math_data.worked_solution("-59 * 21 + 3")
    assert value == -1236
    assert reply.splitlines() == [
        "-59 * 21 + 3",
        "59 * 21 = 59 * 20 + 59 * 1 = 1180 + 59 = 1239, so -59 * 21 = -1239",
        "= -1239 + 3",
        "= -1236",
        "The answer is -1236.",
    ]
