"""The reward functions over a chunk of completions: what the controller runs as a Ray task.

Its own module so that a task's worker process imports only the rewards (no torch, no trainer).
"""

from __future__ import annotations


def score_rewards(reward_names: list[str], texts: list[str], samples: list[dict]) -> tuple[list[list[float]], int]:
    """Each reward function's score of each completion ([n_fns][n]) and the number of failed scorings
    (an exception, NaN or inf scores 0 and is counted; see `posttrain.rl.rewards.score_completions`)."""
    from posttrain.rl.rewards import get_reward_fn, score_completions

    per_fn, errors = [], 0
    for name in reward_names:
        scores, n_errors = score_completions([(get_reward_fn(name), 1.0)], texts, samples)
        per_fn.append([float(s) for s in scores])
        errors += n_errors
    return per_fn, errors
