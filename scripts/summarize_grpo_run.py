"""Summarize a GRPO demo run (scripts/gpu_smollm2_grpo.sh): held-out accuracy before / after, per-step time split.

    python scripts/summarize_grpo_run.py OUT_DIR [--weight-sync cuda_ipc] [--seconds 512]

Reads OUT_DIR/train_metrics.jsonl (the controller's metrics.jsonl: step 0 holds the engine's greedy eval of the
base model, the last step the eval after training) and, when present, OUT_DIR/{base,grpo}_eval.json
(scripts/eval_math.py with HF generate on the base model and on the export). Writes OUT_DIR/summary.json and
OUT_DIR/summary.txt and prints the table. Step times are averaged over the steps after the first (the first
includes warm-up: CUDA-graph capture, compilation of the packed passes); the first is reported on its own. The
sync time is averaged over the steps that updated the policy (a step without an update syncs nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PHASES = ("generate", "reward", "logprobs", "update", "update_worker", "update_pack", "sync", "step")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{line_no}: not valid JSON ({e.msg})") from e
    return rows


def eval_of(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine's held-out eval logged in a metrics row: accuracy overall and per task."""
    if row is None or "eval_accuracy" not in row:
        return None
    prefix = "eval_accuracy/"
    return {"step": row["step"], "accuracy": row["eval_accuracy"],
            "per_task": {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)},
            "response_len_mean": row.get("eval_response_len_mean"), "seconds": row.get("time/eval")}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(out: Path, weight_sync: str, seconds: float | None) -> dict[str, Any]:
    metrics = read_metrics(out / "train_metrics.jsonl")
    steps = [m for m in metrics if "time/step" in m]
    if not steps:
        raise SystemExit(f"error: {out / 'train_metrics.jsonl'} has no GRPO step")
    step0 = next((m for m in metrics if m.get("step") == 0), None)
    after = next((m for m in reversed(metrics) if "eval_accuracy" in m and m.get("step", 0) > 0), None)
    timed = steps[1:] or steps

    def phase_means(rows: list[dict[str, Any]]) -> dict[str, float | None]:
        return {p: mean([r[f"time/{p}"] for r in rows if r.get(f"time/{p}") is not None]) for p in PHASES}

    split = phase_means(timed)
    # a step whose groups all had one reward trains nothing and syncs nothing: not a sync time
    split["sync"] = mean([r["time/sync"] for r in timed if "loss" in r]) if any("loss" in r for r in timed) else None
    summary: dict[str, Any] = {
        "engine_eval": {"before": eval_of(step0), "after": eval_of(after)},
        "steps": len(steps),
        "weight_sync": weight_sync,
        "time_split_mean_s": split,
        "time_split_share": {p: (split[p] / split["step"]) if split[p] is not None and split["step"] else None
                             for p in PHASES if p != "step"},
        "first_step_s": phase_means(steps[:1]),
        "steps_averaged": f"{timed[0]['step']}..{timed[-1]['step']}",
        "rollout_tokens_per_s_mean": mean([r["rollout_tokens_per_s"] for r in timed if r.get("rollout_tokens_per_s")]),
        "train_tokens_per_s_mean": mean([r["train_tokens_per_s"] for r in timed if r.get("train_tokens_per_s")]),
        "sync_s_mean": split["sync"],
        "first_sync_s": step0.get("time/sync_first") if step0 else None,
        "setup_s": step0.get("time/setup") if step0 else None,
        "sampled_accuracy_first_last": [steps[0].get("accuracy"), steps[-1].get("accuracy")],
        "reward_mean_first3_last3": [mean([r["reward_mean"] for r in steps[:3]]),
                                     mean([r["reward_mean"] for r in steps[-3:]])],
        "response_len_mean_first_last": [steps[0].get("response_len_mean"), steps[-1].get("response_len_mean")],
        "script_seconds": seconds,
    }
    for name in ("base", "grpo"):
        path = out / f"{name}_eval.json"
        if path.is_file():
            result = json.loads(path.read_text())
            summary[f"hf_eval_{name}"] = {k: result[k] for k in ("accuracy", "mean_score", "per_task", "scorer", "n")}
    return summary


def table(summary: dict[str, Any]) -> str:
    before, after = summary["engine_eval"]["before"], summary["engine_eval"]["after"]
    hf_b, hf_a = summary.get("hf_eval_base"), summary.get("hf_eval_grpo")

    def f(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

    lines = [f"{'held-out task':18s} {'engine before':>13s} {'engine after':>12s} {'HF before':>10s} {'HF after':>9s}"]
    tasks = sorted(set((before or {}).get("per_task", {})) | set((hf_b or {}).get("per_task", {})))
    for task in tasks + ["all"]:
        def pick(e, hf=False):
            if e is None:
                return None
            if task == "all":
                return e["accuracy"]
            value = e["per_task"].get(task)
            return value["accuracy"] if hf and value else value
        lines.append(f"{task:18s} {f(pick(before)):>13s} {f(pick(after)):>12s} {f(pick(hf_b, True)):>10s} "
                     f"{f(pick(hf_a, True)):>9s}")
    s = summary["time_split_mean_s"]
    lines.append(f"steps {summary['steps']} (times averaged over steps {summary['steps_averaged']}), weight sync "
                 f"{summary['weight_sync']}")
    lines.append("per step: " + "  ".join(f"{p} {f(s[p])}s" for p in PHASES))
    share = summary["time_split_share"]
    lines.append("share of the step: " + "  ".join(f"{p} {share[p]:.0%}" for p in share if share[p] is not None))
    lines.append(f"rollout tokens/s {f(summary['rollout_tokens_per_s_mean'])}  train tokens/s "
                 f"{f(summary['train_tokens_per_s_mean'])}  first sync {f(summary['first_sync_s'])}s  setup "
                 f"{f(summary['setup_s'])}s  script {summary['script_seconds']}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--weight-sync", default="", help="the transport the run used (for the record)")
    parser.add_argument("--seconds", type=float, default=None, help="the whole script's wall time so far")
    args = parser.parse_args(argv)
    summary = summarize(args.out, args.weight_sync, args.seconds)
    text = table(summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
