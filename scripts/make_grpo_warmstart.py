"""Make the warm start of the CPU GRPO debug run: arithmetic data, then a short SFT exported as HF weights.

    python scripts/make_grpo_warmstart.py [--out-dir outputs/debug_grpo_warmstart] [--sft-steps 1000]

Writes `<out-dir>/data/{train,eval}.jsonl` (GRPO prompts "a op b = ?" with their answers; by default a + b with
a, b in 0..4: 20 train problems, 5 held out; from scripts/make_arith_prompts.py), `<out-dir>/data/sft.jsonl`
(the train problems, each --copies times, the answer off by one in --wrong-fraction of the rows: the warm-started
policy puts roughly that much of its mass on wrong neighbours, so GRPO has accuracy to gain; a model this small
memorizes these facts, it does not learn to add, so held-out problems are not the measure), then runs
`train.py --config train_configs/debug_grpo_sft.toml` into `<out-dir>/sft/` (HF export in `<out-dir>/sft/hf`,
which train_configs/debug_grpo.toml starts from). About 30 s on two idle CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _arith_module():
    spec = importlib.util.spec_from_file_location("make_arith_prompts", REPO / "scripts" / "make_arith_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_data(data_dir: Path, *, seed: int, copies: int, wrong_fraction: float, max_operand: int = 9,
               ops: str = "+-", eval_size: int = 40) -> None:
    arith = _arith_module()
    problems = arith.arithmetic_problems(max_operand, ops)
    train, held_out = arith.split_problems(problems, seed=seed, eval_size=eval_size)
    sft = []
    for copy in range(copies):  # several noisy labels per problem: a distribution to learn, not one label
        answer_format = "\\boxed{{answer}}" if copy % 2 == 0 else "{answer}"  # half boxed: the format reward's signal
        sft += arith.sft_rows(train, answer_format=answer_format, wrong_fraction=wrong_fraction, seed=seed + 101 * copy)
    data_dir.mkdir(parents=True, exist_ok=True)
    arith.write_jsonl(data_dir / "train.jsonl", train)
    arith.write_jsonl(data_dir / "eval.jsonl", held_out)
    arith.write_jsonl(data_dir / "sft.jsonl", sft)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/debug_grpo_warmstart"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--wrong-fraction", type=float, default=0.5)
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--max-operand", type=int, default=4)
    parser.add_argument("--ops", default="+")
    parser.add_argument("--eval-size", type=int, default=5)
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    write_data(out / "data", seed=args.seed, copies=args.copies, wrong_fraction=args.wrong_fraction,
               max_operand=args.max_operand, ops=args.ops, eval_size=args.eval_size)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "train_configs" / "debug_grpo_sft.toml"),
           "--job.output_dir", str(out / "sft"), "--data.path", str(out / "data" / "sft.jsonl"),
           "--tokenizer.path", str(REPO / "tests" / "assets" / "tokenizer"), "--training.steps", str(args.sft_steps)]
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"warm start written to {out / 'sft' / 'hf'}")


if __name__ == "__main__":
    main()
