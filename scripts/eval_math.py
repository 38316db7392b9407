"""Greedy-decode a HF model on the held-out arithmetic questions and score the answers as reasoning-gym does.

    python scripts/eval_math.py --hf-dir outputs/smollm2-135m-instruct --eval-file data/math/eval.jsonl \
        [--limit N] [--batch-size 64] [--max-new-tokens 192] [--device auto|cuda|cpu] [--out results.json]

Prompting: each question is the single user turn, rendered by the folder's own chat template with
``add_generation_prompt=True`` (so the ids are exactly those the SFT data trained on); batched with left
padding; ``model.generate`` greedy with the KV cache, stopping at the tokenizer's end-of-turn / eos token.

Answer extraction (from the decoded completion, special tokens skipped), first rule that matches:

1. the text inside the last ``<answer>...</answer>`` pair, stripped (reasoning-gym's ``extract_answer``);
2. the number right after the last ``answer is`` / ``answer:`` (any case, ``**`` / ``$`` / ``=`` allowed
   between), e.g. ``The answer is -1236.`` -> ``-1236``;
3. the last number anywhere in the completion.

A "number" is ``[+-]?`` digits with optional thousands commas and an optional decimal part; commas are
removed and a trailing period is not part of it. No match gives ``None`` (score 0).

Scoring: the extracted string and the row's ``entry`` go to reasoning-gym's own
``get_score_answer_fn(task)(answer, entry)`` when reasoning-gym is importable; otherwise to the built-in copy
of the comparison that task's scorer makes (named by the row's ``scorer`` field): ``exact`` (the base
``ProceduralDataset.score_answer``: 1.0 on equality, else len(oracle)/len(answer) when the oracle is a
substring, else 0) or ``decimal`` (``utils.compute_decimal_reward``: 1.0 when ``Decimal`` values are equal
after removing commas, else the same substring credit). With both available, both are computed and any
disagreement is counted in the output (``scorer_mismatches``). ``accuracy`` is the share of rows scoring 1.0;
``mean_score`` averages the partial credit too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

_NUMBER = r"[+-]?\d(?:\d|,\d{3})*(?:\.\d+)?"
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:=]?\s*(?:\*\*|\$|\\\(|\s)*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER)


def extract_answer(completion: str) -> str | None:
    """The model's final answer as a string (see the module docstring for the rules), or None."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    found = _ANSWER_IS.findall(completion)
    if found:
        return found[-1].replace(",", "")
    numbers = _ANY_NUMBER.findall(completion)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


# ---------------------------------------------------------------------------------------------------------
# The built-in copies of reasoning-gym's comparisons (reasoning_gym 0.1.x: dataset.py, utils.py).

def _substring_credit(answer: str, oracle: str) -> float:
    return len(oracle) / len(answer) if oracle in answer else 0.0


def score_exact(answer: str | None, oracle: str) -> float:
    """``ProceduralDataset.score_answer``: exact string match, else substring partial credit."""
    if not isinstance(answer, str) or len(answer) == 0:
        return 0.0
    if answer == oracle:
        return 1.0
    return _substring_credit(answer, oracle)


def score_decimal(answer: str | None, oracle: str, strip_commas: bool = True) -> float:
    """``utils.compute_decimal_reward``: equal as Decimals (sign, leading zeros, trailing .00 tolerated)."""
    if answer is None or len(answer) == 0:
        return 0.0
    if strip_commas:
        answer, oracle = answer.replace(",", ""), oracle.replace(",", "")
    try:
        if Decimal(answer) == Decimal(oracle):
            return 1.0
    except Exception:  # reasoning-gym catches everything here too (bad literals, signalling NaN)
        pass
    return _substring_credit(answer, oracle)


BUILTIN_SCORERS: dict[str, Callable[[str | None, str], float]] = {"exact": score_exact, "decimal": score_decimal}


def builtin_score(answer: str | None, row: dict[str, Any]) -> float:
    return BUILTIN_SCORERS[row["scorer"]](answer, row["entry"]["answer"])


def reasoning_gym_scorer() -> Callable[[str | None, dict[str, Any]], float] | None:
    """reasoning-gym's own scoring, ``fn(answer, row)``, or None where reasoning-gym is not installed."""
    try:
        import reasoning_gym
    except ImportError:
        return None
    cache: dict[str, Callable] = {}

    def score(answer: str | None, row: dict[str, Any]) -> float:
        if row["task"] not in cache:
            cache[row["task"]] = reasoning_gym.get_score_answer_fn(row["task"])
        return float(cache[row["task"]](answer, row["entry"]))

    return score


# ---------------------------------------------------------------------------------------------------------

def load_rows(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    missing = [k for k in ("question", "answer", "task", "scorer", "entry") if rows and k not in rows[0]]
    if missing:
        raise SystemExit(f"error: {path} rows lack {missing}; make them with scripts/make_math_data.py")
    return rows[:limit] if limit else rows


def prompt_ids(tokenizer, question: str) -> list[int]:
    """What the folder's own chat template renders for one user turn, ready for the assistant's reply."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def generate_completions(model, tokenizer, questions: list[str], *, batch_size: int, max_new_tokens: int,
                         device, temperature: float = 0.0, num_samples: int = 1) -> list[str]:
    """Greedy completions, batched with left padding (prompts sorted by length to waste little padding).

    ``temperature`` > 0 samples instead (plain softmax sampling: no top-p / top-k), ``num_samples`` completions
    per question, returned question by question ([q0 s0, q0 s1, ..., q1 s0, ...]); ``batch_size`` counts
    sequences, so a batch holds ``batch_size // num_samples`` questions."""
    import torch

    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding gives one answer)")
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    batch_size = max(1, batch_size // num_samples)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end_of_turn is not None:
        eos_ids.add(end_of_turn)
    eos_ids.discard(None)
    encoded = [prompt_ids(tokenizer, q) for q in questions]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    completions: list[str] = [""] * (len(encoded) * num_samples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                **sampling,
                num_return_sequences=num_samples,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
            )
        for row, i in enumerate(idx):  # generate repeats each prompt num_samples times, in place
            for j in range(num_samples):
                completions[i * num_samples + j] = tokenizer.decode(
                    out[row * num_samples + j, width:], skip_special_tokens=True)
    return completions


def summarize(rows: list[dict], scores: list[float]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, Any]:
        return {"n": len(values), "accuracy": sum(v == 1.0 for v in values) / max(len(values), 1),
                "mean_score": sum(values) / max(len(values), 1)}

    per_task: dict[str, list[float]] = defaultdict(list)
    for row, s in zip(rows, scores):
        per_task[row["task"]].append(s)
    return {**stats(scores), "per_task": {t: stats(v) for t, v in sorted(per_task.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model folder (weights + tokenizer with chat template)")
    parser.add_argument("--eval-file", type=Path, default=Path("data/math/eval.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights dtype for decoding (default float32: greedy output least sensitive)")
    parser.add_argument("--out", type=Path, default=None, help="write results (with every completion) as JSON")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = load_rows(args.eval_file, args.limit)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    if tokenizer.chat_template is None:
        print(f"error: {args.hf_dir} has no chat template", file=sys.stderr)
        return 1
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    completions = generate_completions(model, tokenizer, [r["question"] for r in rows],
                                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       device=device)
    t_gen = time.perf_counter() - t0

    rg_score = reasoning_gym_scorer()
    samples, scores, mismatches = [], [], 0
    for row, completion in zip(rows, completions):
        extracted = extract_answer(completion)
        builtin = builtin_score(extracted, row)
        score = builtin
        sample = {"task": row["task"], "question": row["question"], "answer": row["answer"],
                  "completion": completion, "extracted": extracted, "score": score}
        if rg_score is not None:
            score = rg_score(extracted, row)
            mismatches += score != builtin
            sample.update(score=score, score_builtin=builtin)
        samples.append(sample)
        scores.append(score)

    result = {
        "hf_dir": str(args.hf_dir),
        "eval_file": str(args.eval_file),
        "scorer": "reasoning_gym" if rg_score is not None else "builtin",
        **summarize(rows, scores),
        "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "device": str(device),
                     "dtype": args.dtype, "decoding": "greedy"},
        "seconds": {"load": round(t_load, 2), "generate": round(t_gen, 2)},
        "samples": samples,
    }
    if rg_score is not None:
        result["scorer_mismatches"] = mismatches
    print(f"{args.hf_dir}: accuracy {result['accuracy']:.3f} (mean score {result['mean_score']:.3f}) on "
          f"{len(rows)} rows, scored by {result['scorer']}; generate {t_gen:.1f}s")
    for task, s in result["per_task"].items():
        print(f"  {task:18s} n={s['n']:4d} accuracy {s['accuracy']:.3f}")
    if rg_score is not None and mismatches:
        print(f"warning: the built-in scorer disagreed with reasoning-gym on {mismatches} rows", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
