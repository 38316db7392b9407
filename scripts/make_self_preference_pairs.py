"""Preference pairs from a model's own answers: sample several completions per math question, score each with
the GRPO math reward, pair a correct one (chosen) with a wrong one (rejected).

    python scripts/make_self_preference_pairs.py --hf-dir outputs/smollm2-135m-instruct \
        --prompts data/grpo_math/train.jsonl:512:train.jsonl --prompts data/grpo_math/eval.jsonl:200:eval.jsonl \
        --out-dir outputs/smollm2_pairs [--samples 8] [--temperature 0.7] [--max-new-tokens 160] [--time-budget-s 90]

``--prompts FILE:N:NAME`` (repeatable): the first N rows of FILE (rows with question + answer, what
scripts/eval_math.py and the GRPO prompts read) become OUT_DIR/NAME. Each question gets ``--samples``
completions (HF ``generate``, plain softmax sampling at ``--temperature``, the folder's chat template as in
eval_math.py). The reward is posttrain's ``math_answer`` (GRPO's: the last number, or ``\\boxed{}``, equal to
the answer as a number). A question with c correct and w wrong distinct completions gives min(c, w) pairs,
each completion used once; a question whose samples are all right or all wrong gives none (counted).

Rows are TRL's conversational form, what ``job.recipe = "dpo"`` reads: ``{"prompt": [user], "chosen":
[assistant], "rejected": [assistant]}``. OUT_DIR/pairs_stats.json: per file the questions sampled, the share
of correct samples (the sampling accuracy), questions with both kinds, pairs written, and what the budget cut.
``--time-budget-s``: no new batch starts past it (the files then hold the questions sampled so far; the files
are made in the order given, so put the one that must be complete first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_math import generate_completions, load_rows  # noqa: E402


def pairs_for_question(question: str, completions: list[str], rewards: list[float]) -> list[dict]:
    """Distinct correct completions paired in order with distinct wrong ones."""
    correct = list(dict.fromkeys(c for c, r in zip(completions, rewards) if r == 1.0 and c.strip()))
    wrong = list(dict.fromkeys(c for c, r in zip(completions, rewards) if r != 1.0 and c.strip()))
    return [{"prompt": [{"role": "user", "content": question}],
             "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]}
            for good, bad in zip(correct, wrong)]


def parse_prompt_spec(text: str) -> tuple[Path, int, str]:
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
        raise SystemExit(f"--prompts {text!r}: expected FILE:N:NAME, e.g. data/grpo_math/eval.jsonl:200:eval.jsonl")
    path = Path(parts[0])
    if not path.is_file():
        raise SystemExit(f"--prompts {text!r}: {path} does not exist")
    return path, int(parts[1]), parts[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="the model whose answers are paired")
    parser.add_argument("--prompts", action="append", required=True, help="FILE:N:NAME (repeatable)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=8, help="completions per question")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=1024, help="sequences per generate call")
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="0: none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.samples < 2 or args.temperature <= 0:
        parser.error("--samples must be >= 2 and --temperature > 0 (pairs need differing answers)")
    specs = [parse_prompt_spec(p) for p in args.prompts]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rl.rewards import get_reward_fn

    t_start = time.perf_counter()
    deadline = t_start + args.time_budget_s if args.time_budget_s > 0 else float("inf")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.bfloat16 if device.type == "cuda"
                                                 else torch.float32).to(device).eval()
    reward = get_reward_fn("math_answer")
    questions_per_call = max(1, args.batch_size // args.samples)
    stats: dict = {"hf_dir": args.hf_dir, "samples": args.samples, "temperature": args.temperature,
                   "max_new_tokens": args.max_new_tokens, "reward": "math_answer", "files": {}}
    for path, limit, name in specs:
        rows = load_rows(path, limit)
        pairs: list[dict] = []
        sampled = correct = with_both = 0
        for start in range(0, len(rows), questions_per_call):
            if time.perf_counter() > deadline:
                break
            chunk = rows[start : start + questions_per_call]
            completions = generate_completions(model, tokenizer, [r["question"] for r in chunk],
                                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                               device=device, temperature=args.temperature,
                                               num_samples=args.samples)
            for i, row in enumerate(chunk):
                mine = completions[i * args.samples : (i + 1) * args.samples]
                rewards = [reward(c, row) for c in mine]
                correct += sum(r == 1.0 for r in rewards)
                new = pairs_for_question(row["question"], mine, rewards)
                with_both += bool(new)
                pairs += new
            sampled += len(chunk)
        out = args.out_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        stats["files"][name] = {
            "source": str(path), "questions": len(rows), "sampled": sampled,
            "cut_by_time_budget": len(rows) - sampled, "sample_accuracy": correct / max(sampled * args.samples, 1),
            "questions_with_both": with_both, "pairs": len(pairs),
        }
        print(f"{name}: {sampled} of {len(rows)} questions sampled x{args.samples}, "
              f"{correct / max(sampled * args.samples, 1):.3f} correct; {with_both} questions with right and "
              f"wrong answers -> {len(pairs)} pairs" + (f" ({len(rows) - sampled} cut by the time budget)"
                                                        if sampled < len(rows) else ""))
    stats["seconds"] = round(time.perf_counter() - t_start, 1)
    (args.out_dir / "pairs_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    empty = [name for name, s in stats["files"].items() if s["pairs"] == 0]
    if empty:
        print(f"error: no pairs in {empty}: every sampled answer was right, or every one wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
