"""Summarize scripts/gpu_smollm2_lora_dpo.sh: OUT_DIR/summary.json and summary.txt, the table printed last.

    python scripts/summarize_lora_dpo_run.py OUT_DIR [--seconds N]

Reads OUT_DIR/{base,sft_full,sft_lora,dpo_full,dpo_lora}_eval.json (scripts/eval_math.py), the runs'
*_metrics.jsonl, pairs_stats.json and phases.jsonl. Per run: steps done, tokens/s (median of the logged windows
after the first, which holds the warm-up), peak memory (largest ``mem_gib``), trainable parameters (with
``--work-dir``: the PEFT adapter's size for LoRA, the export's for full fine-tuning), held-out
accuracy; DPO runs add the reward accuracy on the held-out pairs before training and at the end (``eval_*``).
A run that is missing (skipped, failed) is a row saying so, with its phase's status.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

RUNS = ("sft_full", "sft_lora", "dpo_full", "dpo_lora")


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def safetensors_numel(folder: Path) -> int | None:
    """Elements in a folder's *.safetensors, from their headers (8-byte length, then JSON with the shapes)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def trainable_params(work: Path | None, name: str) -> int | None:
    """A LoRA run trains its adapter (the PEFT export), a full run the whole model (the HF export)."""
    if work is None:
        return None
    adapter = work / name / "adapter"
    return safetensors_numel(adapter if adapter.is_dir() else work / name / "hf")


def run_summary(out: Path, name: str, phases: dict[str, str], work: Path | None = None) -> dict[str, Any]:
    records = read_jsonl(out / f"{name}_metrics.jsonl")
    train = [r for r in records if r.get("tokens_per_s") is not None]
    evals = [r for r in records if r.get("eval_reward_accuracy") is not None]
    result = read_json(out / f"{name}_eval.json")
    summary: dict[str, Any] = {
        "status": phases.get(name, "not run"), "eval_status": phases.get(f"{name}_eval", "not run"),
        "steps": max((r["step"] for r in train), default=0),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in (train[1:] or train)) if train else None,
        "peak_mem_gib": max((r["mem_gib"] for r in train if r.get("mem_gib") is not None), default=None),
        "trainable_params": trainable_params(work, name),
        "final_loss": train[-1].get("loss") if train else None,
        "held_out_accuracy": result["accuracy"] if result else None,
    }
    if name.startswith("dpo"):
        summary["eval_reward_accuracy_before"] = evals[0]["eval_reward_accuracy"] if evals else None
        summary["eval_reward_accuracy_after"] = evals[-1]["eval_reward_accuracy"] if len(evals) > 1 else None
        summary["eval_reward_margin_after"] = evals[-1].get("eval_reward_margin") if len(evals) > 1 else None
        summary["train_reward_accuracy_last"] = train[-1].get("reward_accuracy") if train else None
    return summary


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(summary: dict[str, Any]) -> str:
    base = summary["base_held_out_accuracy"]
    lines = [f"### SmolLM2-135M-Instruct: LoRA vs full, and DPO on its own answers (held-out: "
             f"{summary['n_eval']} questions, base accuracy {fmt(base, '.3f')})", "",
             "| run | steps | tokens/s | peak GiB | trainable | held-out acc (base -> run) | "
             "held-out pair reward acc (before -> after) | status |", "|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        r = summary["runs"][name]
        pairs = "-"
        if name.startswith("dpo"):
            pairs = f"{fmt(r['eval_reward_accuracy_before'], '.3f')} -> {fmt(r['eval_reward_accuracy_after'], '.3f')}"
        trainable = fmt(r["trainable_params"] / 1e6, ".2f") + " M" if r["trainable_params"] else "-"
        status = r["status"] if r["eval_status"] == "ok" or r["status"] != "ok" else f"eval {r['eval_status']}"
        lines.append(f"| {name} | {r['steps']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_mem_gib'], '.2f')} "
                     f"| {trainable} | {fmt(base, '.3f')} -> {fmt(r['held_out_accuracy'], '.3f')} | {pairs} "
                     f"| {status} |")
    pairs = summary.get("pairs") or {}
    for name, s in (pairs.get("files") or {}).items():
        lines.append(f"pairs {name}: {s['pairs']} from {s['questions_with_both']} of {s['sampled']} questions "
                     f"(x{pairs['samples']} samples at T={pairs['temperature']}, {s['sample_accuracy']:.3f} correct)"
                     + (f"; {s['cut_by_time_budget']} questions cut by the time budget" if s["cut_by_time_budget"]
                        else ""))
    lines.append(f"wall time {summary.get('seconds')} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seconds", type=int, default=None, help="the whole call's wall time")
    parser.add_argument("--work-dir", type=Path, default=None, help="the runs' folders (trainable parameters)")
    args = parser.parse_args(argv)
    out = args.out_dir
    phases = {p["phase"]: p["status"] for p in read_jsonl(out / "phases.jsonl")}
    base = read_json(out / "base_eval.json")
    summary = {
        "base_held_out_accuracy": base["accuracy"] if base else None,
        "n_eval": base["n"] if base else None,
        "runs": {name: run_summary(out, name, phases, args.work_dir) for name in RUNS},
        "pairs": read_json(out / "pairs_stats.json"),
        "phases": phases,
        "seconds": args.seconds,
    }
    table = render(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
