"""Make small, verifiable preference pairs from arithmetic: chosen = the correct worked answer, rejected = a wrong one.

    python scripts/make_preference_data.py [--out tests/assets/preference.jsonl] [--eval-out ...] [--n 128]

Each row is conversational (TRL's form): ``{"prompt": [user message], "chosen": [assistant message],
"rejected": [assistant message]}``. The question is ``What is a + b?`` (or ``-``, ``*``) with 1-2 digit numbers;
the chosen answer works it out (``a + b = c.``) and ends with ``The answer is c.``; the rejected one has the same
wording with typical mistakes (off by one, off by ten, a swapped digit pair, the wrong operation): half the
time correct working and a slip in the final answer, half the time wrong working and a final answer that
does not even match it. So the pair differs only in numbers; two signals separate them: the final answer
repeating the working (which a tiny model learns within a CPU minute: the debug DPO run) and the
arithmetic itself being right (what a real model must learn). Seeded: the same arguments always
write the same files; train and eval questions never coincide.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def wrong_answer(a: int, op: str, b: int, correct: int, rng: random.Random) -> int:
    """A plausible mistake, never equal to the correct answer."""
    candidates = [correct + 1, correct - 1, correct + 10, correct - 10]
    if abs(correct) >= 10:
        digits = str(abs(correct))
        swapped = int(digits[::-1]) * (1 if correct >= 0 else -1)
        candidates.append(swapped)
    for other, fn in OPS.items():
        if other != op:
            candidates.append(fn(a, b))
    candidates = [c for c in candidates if c != correct]
    return rng.choice(candidates)


def worked(a: int, op: str, b: int, answer: int, final: int | None = None) -> str:
    return f"{a} {op} {b} = {answer}. The answer is {answer if final is None else final}."


def rejected_answer(a: int, op: str, b: int, correct: int, rng: random.Random) -> str:
    """A wrong final answer: a slip after correct working, or wrong working and then a slip from it too."""
    if rng.random() < 0.5:
        return worked(a, op, b, correct, final=wrong_answer(a, op, b, correct, rng))
    step = wrong_answer(a, op, b, correct, rng)
    final = rng.choice([c for c in (step + 1, step - 1, step + 10, correct) if c != step])
    return worked(a, op, b, step, final=final)


def make_pair(rng: random.Random) -> tuple[str, dict]:
    op = rng.choice(list(OPS))
    a, b = rng.randint(1, 99), rng.randint(1, 99 if op != "*" else 12)
    correct = OPS[op](a, b)
    question = f"What is {a} {op} {b}?"
    row = {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": worked(a, op, b, correct)}],
        "rejected": [{"role": "assistant", "content": rejected_answer(a, op, b, correct, rng)}],
    }
    return question, row


def make_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        question, row = make_pair(rng)
        if question not in seen:
            seen.add(question)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/assets/preference.jsonl")
    parser.add_argument("--eval-out", default="tests/assets/preference_eval.jsonl")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = make_rows(args.n, args.seed)
    held_out = make_rows(args.n_eval, args.seed + 1, exclude={r["prompt"][0]["content"] for r in train})
    for path, rows in ((args.out, train), (args.eval_out, held_out)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
