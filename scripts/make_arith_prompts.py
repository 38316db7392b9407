"""Write the small-number arithmetic task of the CPU debug GRPO run: prompts, held-out prompts, warm-start SFT.

    python scripts/make_arith_prompts.py [--out-dir data/arith] [--seed 0] [--max-operand 9] [--ops +-]
        [--eval-size 40] [--answer-format "{answer}"] [--sft-wrong-fraction 0.0]

Every problem "a <op> b = ?" with a, b in 0..max_operand and op in --ops ("+", "-", "*"), e.g. "3 + 4 = ?" with
answer "7" (subtraction may give negative answers, "3 - 7 = ?" -> "-4"). The problems are shuffled with
Random(seed); the first --eval-size are held out. Writes, each deterministic given the arguments:

- ``train.jsonl`` / ``eval.jsonl``: ``{"prompt": "3 + 4 = ?", "answer": "7"}``, for
  ``posttrain.rl.prompts.PromptSource`` and the ``math_answer`` reward;
- ``sft.jsonl``: the train problems as chat rows ``{"messages": [user: prompt, assistant: answer]}`` with the
  assistant turn ``--answer-format`` (``{answer}`` replaced), for the short SFT that warm-starts the tiny
  policy. ``--sft-wrong-fraction`` of these rows get an answer off by one, so the warm start is imperfect and
  GRPO has accuracy to gain.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(max_operand: int, ops: str) -> list[dict[str, str]]:
    """Every `a op b` with 0 <= a, b <= max_operand, in a fixed order."""
    unknown = set(ops) - set(OPS)
    if unknown or not ops:
        raise ValueError(f"--ops takes characters from {''.join(OPS)}, got {ops!r}")
    return [
        {"prompt": f"{a} {op} {b} = ?", "answer": str(OPS[op](a, b))}
        for op in ops
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def split_problems(problems: list[dict[str, str]], *, seed: int, eval_size: int) -> tuple[list, list]:
    """(train, eval): a seeded shuffle, the first `eval_size` held out."""
    if not 0 < eval_size < len(problems):
        raise ValueError(f"--eval-size must be in [1, {len(problems) - 1}], got {eval_size}")
    shuffled = list(problems)
    random.Random(seed).shuffle(shuffled)
    return shuffled[eval_size:], shuffled[:eval_size]


def sft_rows(train: list[dict[str, str]], *, answer_format: str, wrong_fraction: float, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = []
    for problem in train:
        answer = int(problem["answer"])
        if rng.random() < wrong_fraction:
            answer += rng.choice((-1, 1))
        rows.append({"messages": [
            {"role": "user", "content": problem["prompt"]},
            {"role": "assistant", "content": answer_format.replace("{answer}", str(answer))},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("data/arith"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--ops", default="+-")
    parser.add_argument("--eval-size", type=int, default=40)
    parser.add_argument("--answer-format", default="{answer}")
    parser.add_argument("--sft-wrong-fraction", type=float, default=0.0)
    args = parser.parse_args(argv)
    if "{answer}" not in args.answer_format:
        parser.error("--answer-format must contain {answer}")
    train, held_out = split_problems(arithmetic_problems(args.max_operand, args.ops), seed=args.seed,
                                     eval_size=args.eval_size)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", held_out)
    write_jsonl(args.out_dir / "sft.jsonl", sft_rows(train, answer_format=args.answer_format,
                                                     wrong_fraction=args.sft_wrong_fraction, seed=args.seed))
    print(f"wrote {len(train)} train / {len(held_out)} eval prompts and {len(train)} SFT rows to {args.out_dir}")


if __name__ == "__main__":
    main()
