"""Make the prompts of the SmolLM2-135M GRPO run from the SFT demo's reasoning-gym tasks, offline and seeded.

    python scripts/make_grpo_math_prompts.py [--out-dir data/grpo_math] [--train-size 12000] [--eval-size 200]

Writes ``train.jsonl`` and ``eval.jsonl``, rows ``{"question", "answer", "task", "scorer", "entry"}`` (what
``posttrain.rl.prompts.PromptSource`` reads: the question is the single user turn; ``scripts/eval_math.py``
scores the same rows). ``eval.jsonl`` holds the SFT demo's held-out set (shuffled) (``scripts/make_math_data.py``: the same
tasks, configs and seed range, so the base model's 0.20 there is comparable); ``train.jsonl`` holds questions
from the training seed range, every held-out question removed. reasoning-gym is needed only here: the files
carry the answers, and the GRPO reward (``math_answer``) compares numbers without it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from make_math_data import (
    TASKS,
    TRAIN_SEED_BASE,
    held_out_items,
    question_row,
    task_counts,
    task_dataset,
    task_seed,
    write_jsonl,
)


def make_prompt_rows(train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, per-task counts); the eval rows are make_math_data's for the same seed."""
    train_rows: list[dict] = []
    eval_rows: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    for k, (task, n_eval, n_train) in enumerate(zip(TASKS, task_counts(eval_size), task_counts(train_size))):
        held_out = held_out_items(task, k, n_eval, seed)
        eval_rows += [question_row(item, task) for item in held_out]
        questions = {item["question"] for item in held_out}
        max_items = 4 * n_train + 1000
        train_dataset = task_dataset(task, max_items, TRAIN_SEED_BASE + task_seed(seed, k))
        kept = dropped = 0
        for i in range(max_items):
            if kept == n_train:
                break
            item = train_dataset[i]
            if item["question"] in questions:
                dropped += 1
                continue
            train_rows.append(question_row(item, task))
            kept += 1
        if kept < n_train:
            raise RuntimeError(f"{task.name}: only {kept} of {n_train} train prompts in {max_items} draws")
        counts[task.name] = {"train": kept, "eval": n_eval, "dropped_eval_overlap": dropped}
    random.Random(seed).shuffle(train_rows)
    random.Random(seed + 1).shuffle(eval_rows)  # so that any prefix (eval_size, --limit) mixes the tasks
    return train_rows, eval_rows, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("data/grpo_math"), help="default data/grpo_math")
    parser.add_argument("--train-size", type=int, default=12_000, help="training prompts (default 12000)")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out prompts (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="picks the seed ranges and the train order")
    args = parser.parse_args(argv)
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        print("error: reasoning-gym is not installed; `pip install reasoning-gym` (only needed to make the data)",
              file=sys.stderr)
        return 1
    train_rows, eval_rows, counts = make_prompt_rows(args.train_size, args.eval_size, args.seed)
    write_jsonl(args.out_dir / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    print(json.dumps(counts))
    print(f"wrote {len(train_rows)} train and {len(eval_rows)} eval prompts to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
