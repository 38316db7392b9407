"""The reward functions over a chunk of completions: what the controller runs as a Ray task.

Its own module so that a task's worker process imports only the rewards (no torch, no trainer).
"""

from __future__ import annotations


def score_rewards(reward_names: list[str], texts: list[str], samples: list[dict]) -> tuple[list[list[float]], int]:
    """Each reward function's score of each completion ([n_fns][n]) and the number of failed scorings
    (an exception, NaN or inf scores 0 and is counted; see `posttrain.rl.rewards.score_each`)."""
    from posttrain.rl.rewards import get_reward_fn, score_each

    return score_each([(get_reward_fn(name), 1.0) for name in reward_names], texts, samples)
