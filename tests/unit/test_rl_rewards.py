"""Reward functions: answer extraction and comparison, the registry, and scoring that survives bad rewards."""

from __future__ import annotations

import logging
import math

import pytest

from posttrain.inference.math_answer import (
    answers_match,
    boxed_contents,
    extract_math_answer,
    math_answer_reward,
    parse_number,
)
from posttrain.rl.rewards import (
    REWARD_FNS,
    extract_reasoning_gym_answer,
    get_reward_fn,
    score_completions,
    score_each,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{12}. Check: 3 * 4 = 12, plus 5", "12"),  # the box beats later numbers
        ("\\boxed{1} first, then \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # nested braces
        ("\\boxed{\\text{yes {really}}}", "\\text{yes {really}}"),
        ("\\boxed{} and 7", "7"),  # an empty box is no answer
        ("\\boxed{5 unclosed and 9", "9"),  # an unclosed box is ignored
        ("3 + 4 = 7", "7"),
        ("we get 1,234 apples.", "1,234"),
        ("It is -7.", "-7"),
        ("It is \u22127", "-7"),  # unicode minus
        ("the value 12.50 in total", "12.50"),
        ("half: 3/4", "3/4"),
        ("10-3 gives 7-2", "2"),  # a minus between numbers is not a sign
        ("the list 1,2,3", "3"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, gold, same",
    [
        ("12", "12", True),
        ("12.0", "12", True),
        ("1,234", "1234", True),
        ("1234", "1,234", True),
        ("3/4", "0.75", True),
        ("\\frac{3}{4}", "0.75", True),
        ("-\\frac{1}{2}", "-0.5", True),
        ("\\dfrac{6}{8}", "3/4", True),
        ("-7", "-7", True),
        ("-7", "7", False),
        ("x = 5", "5", True),
        ("$5$", "5", True),
        ("5 \\text{ apples}", "5", False),  # units make it not a number; compared as strings
        ("12", "12.01", False),
        ("1/0", "0", False),
        ("Yes", "yes", True),  # non-numbers: whitespace- and case-insensitive strings
        ("1,2", "12", False),  # not a thousands separator
        (None, "1", False),
    ],
)
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_parse_number_exact_values():
    assert parse_number("0.1") + parse_number("0.2") == parse_number("3/10")  # exact, no float rounding
    assert parse_number(".5") == parse_number("1/2")
    assert parse_number("abc") is None


@pytest.mark.parametrize(
    "text, answer, reward",
    [
        ("3 + 4 = 7", "7", 1.0),
        ("\\boxed{7}", 7, 1.0),  # a numeric gold answer
        ("7 is wrong, \\boxed{8}", "7", 0.0),
        ("I think it is 1,000,000.", "1000000", 1.0),
        ("\\boxed{0.75}", "3/4", 1.0),
        ("-4", "-4", 1.0),
        ("4", "-4", 0.0),
        ("nothing", "4", 0.0),
    ],
)
def test_math_answer_reward(text, answer, reward):
    assert math_answer_reward(text, {"answer": answer}) == reward


def test_format_rewards():
    fmt = get_reward_fn("format")
    assert fmt("so \\boxed{3}", {}) == 1.0
    assert fmt("so \\boxed{ }", {}) == 0.0
    assert fmt("so 3", {}) == 0.0
    tagged = get_reward_fn("format:<answer>.+</answer>")
    assert tagged("<answer>\n7\n</answer>", {}) == 1.0
    assert tagged("<answer></answer>", {}) == 0.0
    assert boxed_contents("\\fbox{a}\\boxed{b{c}}") == ["a", "b{c}"]


def test_get_reward_fn_builtins_import_paths_and_errors():
    assert set(REWARD_FNS) >= {"math_answer", "format", "reasoning_gym"}
    assert get_reward_fn("math_answer") is math_answer_reward
    assert get_reward_fn("posttrain.rl.rewards:math_answer_reward") is math_answer_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'.*math_answer"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="grpo.rewards.*no module named"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="regular expression"):
        get_reward_fn("format:([")


def test_score_completions_weights_and_sums():
    samples = [{"answer": "7"}, {"answer": "3"}]
    texts = ["\\boxed{7}", "it is 4"]
    rewards, n_errors = score_completions(
        [(get_reward_fn("math_answer"), 1.0), (get_reward_fn("format"), 0.5)], texts, samples
    )
    assert rewards == [1.5, 0.0] and n_errors == 0


def test_bad_rewards_score_zero_are_counted_and_logged(caplog):
    def raises(text, sample):
        if sample["answer"] == "boom":
            raise RuntimeError("broken scorer")
        return 1.0

    def bad_values(text, sample):
        return {"nan": math.nan, "inf": math.inf, "none": None, "str": "high"}.get(sample["answer"], 1.0)

    samples = [{"answer": a} for a in ("boom", "nan", "inf", "none", "str", "ok")]
    texts = ["x"] * len(samples)
    with caplog.at_level(logging.WARNING, logger="posttrain.rl.rewards"):
        rewards, n_errors = score_completions([(raises, 1.0), (bad_values, 2.0)], texts, samples)
    # each failing call scores 0; the other function still counts
    assert rewards == [2.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    assert n_errors == 5
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken scorer" in m and '"answer": "boom"' in m for m in messages)
    assert any("returned nan" in m and '"answer": "nan"' in m for m in messages)
    scores, n = score_each([(bad_values, 2.0)], texts, samples)
    assert scores == [[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]] and n == 4


def test_error_logging_is_capped_per_call(caplog):
    def always(text, sample):
        raise ValueError("no")

    with caplog.at_level(logging.WARNING, logger="posttrain.rl.rewards"):
        rewards, n_errors = score_completions([(always, 1.0)], ["a"] * 50, [{"answer": "1"}] * 50)
    assert rewards == [0.0] * 50 and n_errors == 50
    assert len(caplog.records) <= 6 and "50 reward calls failed" in caplog.records[-1].getMessage()


def test_reasoning_gym_answer_extraction():
    assert extract_reasoning_gym_answer("\\boxed{1,234}") == "1234"
    assert extract_reasoning_gym_answer("\\boxed{12.0}") == "12"
    assert extract_reasoning_gym_answer("<answer> -5 </answer> then 9") == "-5"
    assert extract_reasoning_gym_answer("so 3.50") == "3.50"
    assert extract_reasoning_gym_answer("nothing") is None


def test_reasoning_gym_reward_uses_the_tasks_own_scorer():
    pytest.importorskip("reasoning_gym")
    from posttrain.rl.prompts import PromptSource

    source = PromptSource("reasoning_gym:basic_arithmetic,gsm_symbolic", seed=3, size=20)
    samples = source.next_batch(6)
    fn = get_reward_fn("reasoning_gym")
    right = [f"Working... \\boxed{{{s['answer']}}}" for s in samples]
    wrong = [f"\\boxed{{{int(s['answer']) + 1}}}" for s in samples]
    rewards, n_errors = score_completions([(fn, 1.0)], right + wrong, samples + samples)
    assert n_errors == 0
    assert rewards[:6] == [1.0] * 6 and all(r < 1.0 for r in rewards[6:])
    # a file row carrying a reasoning-gym entry (as scripts/make_math_data.py writes) scores the same way
    entry = samples[0]["entry"]
    assert fn(f"<answer>{entry['answer']}</answer>", {"task": samples[0]["task"], "entry": entry}) == 1.0


def test_reasoning_gym_reward_without_an_entry_is_a_counted_error():
    rewards, n_errors = score_completions([(get_reward_fn("reasoning_gym"), 1.0)], ["7"], [{"answer": "7"}])
    assert rewards == [0.0] and n_errors == 1


def test_a_reward_task_scores_without_importing_torch():
    """The controller's reward tasks run in Ray worker processes; importing torch there cost every GRPO run a few
    CPU-seconds (more on a busy machine) before its first step could be scored."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from posttrain.rl.reward_tasks import score_rewards\n"
            "print(score_rewards(['math_answer', 'format'], ['so \\\\boxed{7}', '8'], [{'answer': '7'}] * 2))\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores, heavy = proc.stdout.strip().splitlines()
    assert scores == "([[1.0, 0.0], [1.0, 0.0]], 0)"
    assert heavy == "[]"
