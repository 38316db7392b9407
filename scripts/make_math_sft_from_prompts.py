"""SFT rows (the SFT demo's worked solutions) for the questions of a math prompt file, without reasoning-gym.

    python scripts/make_math_sft_from_prompts.py data/grpo_math/train.jsonl OUT.jsonl [--limit N]

Prompt rows (``{"question", "answer", "task", "entry"}``: scripts/make_grpo_math_prompts.py) carry
reasoning-gym's expression in ``entry.metadata.expression``; each becomes the chat row of
scripts/make_math_data.py: the question as the user turn, ``worked_solution(expression)`` as the reply. So a
GPU machine without reasoning-gym makes SFT data from the GRPO prompts it already has (their questions are
disjoint from the held-out set). A row without an expression, or whose worked value is not the row's answer, is
dropped and counted (never trained on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_math_data import worked_solution, write_jsonl  # noqa: E402


def sft_rows(prompt_rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    rows, dropped = [], {"no_expression": 0, "answer_mismatch": 0}
    for row in prompt_rows:
        expression = ((row.get("entry") or {}).get("metadata") or {}).get("expression")
        if not expression:
            dropped["no_expression"] += 1
            continue
        reply, value = worked_solution(expression)
        if str(value) != str(row["answer"]):
            dropped["answer_mismatch"] += 1
            continue
        rows.append({"messages": [{"role": "user", "content": row["question"]},
                                  {"role": "assistant", "content": reply}]})
    return rows, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=0, help="the first N prompt rows (0: all)")
    args = parser.parse_args(argv)
    prompt_rows = []
    with args.prompts.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    prompt_rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {args.prompts}:{n}: not JSON ({err.msg})") from None
    if args.limit:
        prompt_rows = prompt_rows[: args.limit]
    rows, dropped = sft_rows(prompt_rows)
    write_jsonl(args.out, rows)
    print(f"{args.out}: {len(rows)} SFT rows from {len(prompt_rows)} prompts "
          f"(dropped: {dropped['no_expression']} without an expression, {dropped['answer_mismatch']} whose worked "
          f"value differs from the answer)")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
