"""Reward functions: a registry of built-ins, user functions by import path, and fault-tolerant scoring.

A reward function is `fn(completion_text: str, sample: dict) -> float`, where `sample` is the prompt's dict
from `PromptSource.next_batch` (it holds "answer", "task", and for reasoning-gym prompts "entry").

Built-ins (`get_reward_fn(name)`):
- "math_answer": 1.0 when the completion's final answer equals sample["answer"] as a number (or as a
  normalised string when either is not a number), else 0.0. The final answer is the content of the last
  `\\boxed{...}` (nested braces allowed), else the last number in the text (see `extract_math_answer`).
  Numbers compare exactly as fractions: "1,234" == "1234", "12.0" == "12", "3/4" == "0.75" == "\\frac{3}{4}".
- "format": 1.0 when the completion contains a non-empty `\\boxed{...}`, else 0.0; "format:<regex>" instead
  checks that the regex (Python `re.search`, DOTALL) matches.
- "reasoning_gym": the sample's own reasoning-gym scorer: `dataset.score_answer(answer, sample["entry"])` for
  the dataset named by sample["task"] (built with sample["task_config"] when present), the answer being the
  last `\\boxed{}`, else the last `<answer>...</answer>`, else the last number. reasoning-gym is imported
  on first use.
- any "package.module:function" (posttrain.extensions.load_callable).

`score_completions` combines weighted functions and never raises: an exception, a non-number or a NaN / inf
from one function scores that function 0 for that completion, is counted, and is logged (a warning with the
sample) for the first few of each call.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.extensions import is_import_path, load_callable
from posttrain.inference.math_answer import (
    boxed_contents,
    canonical_number,
    last_number,
    math_answer_reward,
)

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]

MAX_LOGGED_ERRORS_PER_CALL = 5
_LOG_CHARS = 400
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# ---------------------------------------------------------------------------------------------------------
# Built-in reward functions

def boxed_format_reward(text: str, sample: dict) -> float:
    """1.0 when the completion contains a non-empty `\\boxed{...}`, else 0.0."""
    return 1.0 if any(b.strip() for b in boxed_contents(text)) else 0.0


def regex_format_reward(pattern: str) -> RewardFn:
    """A reward of 1.0 when `re.search(pattern, text, re.DOTALL)` matches, else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(text: str, sample: dict) -> float:
        return 1.0 if compiled.search(text) else 0.0

    reward.__name__ = f"format[{pattern}]"
    return reward


def extract_reasoning_gym_answer(text: str) -> str | None:
    """Last non-empty `\\boxed{}`, else last `<answer>...</answer>` (reasoning-gym's own format), else the last
    number; integer-valued numbers in canonical form (`canonical_number`)."""
    boxes = [b.strip() for b in boxed_contents(text) if b.strip()]
    if boxes:
        return canonical_number(boxes[-1])
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    number = last_number(text)
    return canonical_number(number) if number is not None else None


_RG_SCORERS: dict[str, Callable[[Any, dict], float]] = {}


def reasoning_gym_scorer(task: str, task_config: dict | None = None) -> Callable[[Any, dict], float]:
    """`score_answer(answer, entry)` of reasoning-gym's dataset `task` (built with `task_config`), cached."""
    key = task + json.dumps(task_config or {}, sort_keys=True, default=str)
    if key not in _RG_SCORERS:
        try:
            import reasoning_gym
        except ImportError as e:
            raise ImportError(
                "the 'reasoning_gym' reward needs the reasoning-gym package: pip install reasoning-gym"
            ) from e
        config = dict(task_config or {})
        config.setdefault("size", 1)
        _RG_SCORERS[key] = reasoning_gym.create_dataset(task, **config).score_answer
    return _RG_SCORERS[key]


def reasoning_gym_reward(text: str, sample: dict) -> float:
    """reasoning-gym's own score of the completion's answer against the sample's entry (see module doc)."""
    entry = sample.get("entry")
    if not isinstance(entry, dict):
        raise TypeError("the 'reasoning_gym' reward needs a sample with an 'entry' (a reasoning-gym item)")
    task = sample.get("task") or entry.get("metadata", {}).get("source_dataset")
    if not task:
        raise ValueError("the 'reasoning_gym' reward needs the sample's 'task' (the reasoning-gym dataset name)")
    score = reasoning_gym_scorer(task, sample.get("task_config"))
    return float(score(extract_reasoning_gym_answer(text), entry))


REWARD_FNS: dict[str, RewardFn] = {
    "math_answer": math_answer_reward,
    "format": boxed_format_reward,
    "reasoning_gym": reasoning_gym_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Add a built-in reward under `name` (config files can also name any `module:function` directly)."""
    if name in REWARD_FNS and REWARD_FNS[name] is not fn:
        raise ValueError(f"a reward named {name!r} is already registered")
    REWARD_FNS[name] = fn


def get_reward_fn(name: str, *, key: str = "grpo.rewards") -> RewardFn:
    """The reward function called `name`: a built-in, "format:<regex>", or "package.module:function"."""
    name = name.strip()
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if name.startswith("format:"):
        pattern = name[len("format:"):]
        try:
            return regex_format_reward(pattern)
        except re.error as e:
            raise ValueError(f"{key}: {name!r} is not a valid regular expression ({e})") from e
    if is_import_path(name):
        return load_callable(name, key=key)
    raise ValueError(
        f"{key}: unknown reward {name!r}; use one of {sorted(REWARD_FNS)}, 'format:<regex>', "
        "or a function as 'package.module:function'"
    )


# ---------------------------------------------------------------------------------------------------------
# Scoring a batch

def _describe(sample: dict) -> str:
    try:
        text = json.dumps(sample, ensure_ascii=False, default=str)
    except Exception:  # noqa: BLE001 - a description must never fail
        text = repr(sample)
    return text if len(text) <= _LOG_CHARS else text[:_LOG_CHARS] + "..."


def score_each(
    fns: Sequence[tuple[RewardFn, float]], texts: Sequence[str], samples: Sequence[dict]
) -> tuple[list[list[float]], int]:
    """Unweighted scores `[len(fns)][len(texts)]` and the number of failed calls (each scored 0)."""
    if len(texts) != len(samples):
        raise ValueError(f"{len(texts)} completions but {len(samples)} samples")
    scores: list[list[float]] = []
    n_errors = 0
    for fn, _ in fns:
        name = getattr(fn, "__name__", repr(fn))
        column = []
        for text, sample in zip(texts, samples):
            problem = None
            try:
                value = float(fn(text, sample))
                if not math.isfinite(value):
                    problem = f"returned {value}"
            except Exception as e:  # noqa: BLE001 - a bad reward must not kill the run
                problem = f"raised {type(e).__name__}: {e}"
            if problem is not None:
                n_errors += 1
                if n_errors <= MAX_LOGGED_ERRORS_PER_CALL:
                    logger.warning(
                        "reward %s %s; scored 0. sample: %s completion: %r",
                        name, problem, _describe(sample), text[:_LOG_CHARS],
                    )
                value = 0.0
            column.append(value)
        scores.append(column)
    if n_errors > MAX_LOGGED_ERRORS_PER_CALL:
        logger.warning("%d reward calls failed in this batch (first %d logged)", n_errors, MAX_LOGGED_ERRORS_PER_CALL)
    return scores, n_errors


def score_completions(
    fns: Sequence[tuple[RewardFn, float]], texts: Sequence[str], samples: Sequence[dict]
) -> tuple[list[float], int]:
    """Per completion the weighted sum of the reward functions, and how many calls failed; never raises
    for a bad reward (exception, non-number, NaN or inf: that call scores 0, counted and logged)."""
    scores, n_errors = score_each(fns, texts, samples)
    totals = [0.0] * len(texts)
    for (_, weight), column in zip(fns, scores):
        for i, value in enumerate(column):
            totals[i] += weight * value
    return totals, n_errors
