"""Make the small-arithmetic SFT data for the SmolLM2-135M demo from reasoning-gym tasks, offline and seeded.

    python scripts/make_math_data.py [--out-dir data/math] [--train-size 60000] [--eval-size 200] [--seed 0]

Writes two files:

- ``train.jsonl``: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``. The user turn is the
  reasoning-gym question verbatim; the assistant turn is a short worked solution that reduces the expression
  one operation at a time (a two-digit product is split into tens and units on a side line) and ends with
  ``The answer is <answer>.``
- ``eval.jsonl``: ``{"question", "answer", "task", "scorer", "entry"}`` from a disjoint seed range (and with
  every eval question removed from train). ``entry`` is reasoning-gym's own item (question, answer, metadata),
  so ``dataset.score_answer(answer, entry)`` can score it; ``scorer`` names the comparison that task's
  ``score_answer`` makes (``exact`` or ``decimal``), which ``scripts/eval_math.py`` reimplements so that
  scoring works where reasoning-gym is not installed.

Tasks (see ``TASKS``): ``basic_arithmetic`` (2-3 terms, 1-2 digits, + - * / with parentheses and negative
numbers), ``chain_sum`` (2-4 terms of 1-2 digits, + -) and ``products`` (two factors of 1-2 digits).
Only reasoning-gym (``pip install reasoning-gym``) is needed, and only here: the files carry everything else.
"""

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT_DIR = Path("data/math")
TRAIN_SEED_BASE = 1_000_000  # reasoning-gym item i uses Random(seed + i); the two ranges never meet
EVAL_SEED_BASE = 900_000_000
TASK_SEED_STRIDE = 10_000_000  # distinct seed range per task, so tasks never share a random stream


@dataclass(frozen=True)
class MathTask:
    """One reasoning-gym task, its config and its share of the data."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    scorer: str = "exact"  # what this task's score_answer compares: "exact" (the base class) or "decimal"


TASKS: tuple[MathTask, ...] = (
    MathTask(
        "basic_arithmetic",
        dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-", "*", "/"),
             allow_parentheses=True, allow_negation=False, format_style="simple", whitespace="single"),
        weight=0.4,
        scorer="exact",
    ),
    MathTask("chain_sum", dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2), weight=0.35, scorer="decimal"),
    MathTask("products", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2), weight=0.25, scorer="decimal"),
)


# ---------------------------------------------------------------------------------------------------------
# Worked solutions: parse reasoning-gym's space-separated expression, then reduce it one operation at a time.

@dataclass
class Num:
    value: int


@dataclass
class BinOp:
    op: str
    left: Any
    right: Any


@dataclass
class Group:
    """A parenthesized sub-expression as written, ``( x )``, or negated, ``-( x )``."""

    inner: Any
    negated: bool = False


def parse_expression(text: str) -> Any:
    """Parse reasoning-gym's expression text (tokens separated by single spaces) with Python's precedence."""
    tokens = text.split()
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> Any:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = BinOp(op, node, term())
        return node

    def term() -> Any:
        node = factor()
        while peek() in ("*", "/"):
            op = take()
            node = BinOp(op, node, factor())
        return node

    def factor() -> Any:
        tok = take()
        if tok in ("(", "-("):
            inner = expr()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            return Group(inner, negated=tok == "-(")
        return Num(int(tok))

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {text!r}")
    return tree


def render(node: Any) -> str:
    if isinstance(node, Num):
        return str(node.value)
    if isinstance(node, Group):
        return f"{'-(' if node.negated else '('} {render(node.inner)} )"
    return f"{render(node.left)} {node.op} {render(node.right)}"


def apply_op(op: str, a: int, b: int) -> int:
    """reasoning-gym evaluates ``/`` as floor division (its generator makes it exact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def multiplication_side_line(a: int, b: int) -> str | None:
    """``58 * 26 = 58 * 20 + 58 * 6 = 1160 + 348 = 1508`` for two factors of two or more digits, else None."""
    x, y = abs(a), abs(b)
    if x < 10 or y < 10 or y % 10 == 0:
        return None
    tens, units = y - y % 10, y % 10
    line = f"{x} * {y} = {x} * {tens} + {x} * {units} = {x * tens} + {x * units} = {x * y}"
    if (a < 0) != (b < 0):
        line += f", so {a} * {b} = {a * b}"
    return line


def _collapse(node: Any) -> Any:
    """Drop the parentheses around a group that has become a single number."""
    if isinstance(node, Group):
        inner = _collapse(node.inner)
        if isinstance(inner, Num):
            return Num(-inner.value if node.negated else inner.value)
        return Group(inner, node.negated)
    if isinstance(node, BinOp):
        return BinOp(node.op, _collapse(node.left), _collapse(node.right))
    return node


def _reduce_leftmost(node: Any, side_lines: list[str]) -> tuple[Any, bool]:
    """Evaluate the leftmost operation whose operands are both numbers; True when one was found."""
    if isinstance(node, Num):
        return node, False
    if isinstance(node, Group):
        inner, done = _reduce_leftmost(node.inner, side_lines)
        return Group(inner, node.negated), done
    if isinstance(node.left, Num) and isinstance(node.right, Num):
        if node.op == "*":
            line = multiplication_side_line(node.left.value, node.right.value)
            if line:
                side_lines.append(line)
        return Num(apply_op(node.op, node.left.value, node.right.value)), True
    left, done = _reduce_leftmost(node.left, side_lines)
    if done:
        return BinOp(node.op, left, node.right), True
    right, done = _reduce_leftmost(node.right, side_lines)
    return BinOp(node.op, node.left, right), done


def worked_solution(expression: str) -> tuple[str, int]:
    """The assistant's reply for ``expression`` and the value it arrives at."""
    node = parse_expression(expression)
    lines = [expression]
    node = _collapse(node)
    while not isinstance(node, Num):
        side_lines: list[str] = []
        node, done = _reduce_leftmost(node, side_lines)
        if not done:
            raise ValueError(f"could not reduce {expression!r}")
        node = _collapse(node)
        lines.extend(side_lines)
        lines.append(f"= {render(node)}")
    lines.append(f"The answer is {node.value}.")
    return "\n".join(lines), node.value


# ---------------------------------------------------------------------------------------------------------

def task_counts(total: int, tasks: tuple[MathTask, ...] = TASKS) -> list[int]:
    """Split ``total`` rows over the tasks by weight (largest remainders get the leftovers)."""
    weights = [t.weight for t in tasks]
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(tasks)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def task_dataset(task: MathTask, size: int, seed: int):
    """reasoning-gym's dataset for ``task``; item i is drawn from Random(seed + i), whatever ``size`` says."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task.name, seed=seed, size=size, **task.config)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def task_seed(seed: int, k: int) -> int:
    """The seed offset of the k-th task: the eval and train seed bases are added to it."""
    return seed * 7919 + k * TASK_SEED_STRIDE


def held_out_items(task: MathTask, k: int, n_eval: int, seed: int) -> list[dict]:
    """The k-th task's held-out items (the eval seed range); the SFT demo and the GRPO run share them."""
    dataset = task_dataset(task, n_eval, EVAL_SEED_BASE + task_seed(seed, k))
    return [dataset[i] for i in range(n_eval)]


def question_row(item: dict, task: MathTask) -> dict:
    """An eval / prompt row: the question as the single user turn, its answer and how to score it."""
    return {"question": item["question"], "answer": item["answer"], "task": task.name, "scorer": task.scorer,
            "entry": _json_safe(item)}


def make_rows(train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Return (train rows, eval rows, a summary); train rows are shuffled with ``seed``."""
    eval_rows: list[dict] = []
    train_rows: list[dict] = []
    summary: dict[str, Any] = {"tasks": {}}
    for k, (task, n_eval, n_train) in enumerate(zip(TASKS, task_counts(eval_size), task_counts(train_size))):
        eval_items = held_out_items(task, k, n_eval, seed)
        eval_questions = {item["question"] for item in eval_items}
        eval_rows += [question_row(item, task) for item in eval_items]
        # Draw items until n_train survive (eval questions are dropped; small tasks repeat questions often).
        max_items = 4 * n_train + 1000
        train_dataset = task_dataset(task, max_items, TRAIN_SEED_BASE + task_seed(seed, k))
        kept = mismatched = overlap = 0
        for i in range(max_items):
            if kept == n_train:
                break
            item = train_dataset[i]
            if item["question"] in eval_questions:
                overlap += 1
                continue
            reply, value = worked_solution(item["metadata"]["expression"])
            if str(value) != item["answer"]:  # never train on a solution that disagrees with the oracle
                mismatched += 1
                continue
            train_rows.append({"messages": [
                {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": reply},
            ]})
            kept += 1
        if kept < n_train:
            raise RuntimeError(f"{task.name}: only {kept} of {n_train} train rows survived in {max_items} draws")
        summary["tasks"][task.name] = {"train": kept, "eval": n_eval, "dropped_eval_overlap": overlap,
                                       "dropped_mismatch": mismatched}
    random.Random(seed).shuffle(train_rows)
    return train_rows, eval_rows, summary


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"default {DEFAULT_OUT_DIR}")
    parser.add_argument("--train-size", type=int, default=60_000, help="SFT rows (default 60000)")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out rows (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="picks the seed ranges and the train order")
    args = parser.parse_args(argv)
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        print("error: reasoning-gym is not installed; `pip install reasoning-gym` (only needed to make the data)",
              file=sys.stderr)
        return 1

    train_rows, eval_rows, summary = make_rows(args.train_size, args.eval_size, args.seed)
    write_jsonl(args.out_dir / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    summary.update(train_file=str(args.out_dir / "train.jsonl"), eval_file=str(args.out_dir / "eval.jsonl"),
                   seed=args.seed, configs={t.name: _json_safe(t.config) for t in TASKS})
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["tasks"]))
    print(f"wrote {len(train_rows)} train rows and {len(eval_rows)} eval rows to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
