"""Next-event accuracy / recall@k of a trained model on held-out event sequences, next to the baselines.

    python scripts/eval_next_event.py --hf-dir outputs/debug_events/hf \
        --train tests/assets/events/train.npy --eval tests/assets/events/eval.jsonl [--n-events 300]

Prints one JSON object: {"model": {...}, "frequency": {...}, "bigram": {...}}, each with recall@1 (=
accuracy), recall@5, recall@10 and the number of scored positions (see posttrain/evaluation/next_event.py).
"""

from __future__ import annotations

import argparse
import json

import torch

from posttrain.evaluation.next_event import next_event_report, read_sequences
from posttrain.models import load_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="an HF export (train.py with checkpoint.export_hf)")
    parser.add_argument("--train", required=True, help="the training sequences (for the baselines)")
    parser.add_argument("--eval", required=True, help="held-out sequences")
    parser.add_argument("--n-events", type=int, default=None, help="rank only ids below this (default: all)")
    parser.add_argument("--min-context", type=int, default=1, help="events seen before the first scored one")
    args = parser.parse_args()
    model = load_hf(args.hf_dir, dtype=torch.float32, device="cpu")
    report = next_event_report(
        model, read_sequences(args.train), read_sequences(args.eval),
        min_context=args.min_context, n_events=args.n_events,
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
