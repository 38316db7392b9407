"""Synthetic event sequences with learnable structure, for training a transformer from scratch on IDs.

    python scripts/make_event_data.py [--out tests/assets/events] [--seed 0]

The world: 300 event IDs (0..299) in 10 categories of 30 (category = id // 30). Each user has one of 5
latent types; a type likes 3 categories and has its own Markov chain: from every event, 4 possible next
events (mostly inside the liked categories) with probabilities 0.55 / 0.25 / 0.12 / 0.08. A user's sequence
starts at an event of a liked category and follows its type's chain for 24..64 events. The type is never
written down: a model has to infer it from the events seen so far, so it can beat a bigram model (which
mixes the 5 chains) as well as the frequency baseline (which ignores context).

Writes (all reproducible from the seed, < 300 KB together):
- train.npy + train.idx.npy: 1500 sequences as a uint16 token stream + document offsets (memory-mapped);
- eval.jsonl: 200 held-out sequences of other users, one `{"input_ids": [...], "user_type": t}` per line;
- world.json: the generating parameters (for the curious; no training code reads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

N_EVENTS = 300
EVENTS_PER_CATEGORY = 30
N_CATEGORIES = N_EVENTS // EVENTS_PER_CATEGORY
N_TYPES = 5
LIKED_CATEGORIES = 3
SUCCESSOR_PROBS = (0.55, 0.25, 0.12, 0.08)
IN_LIKED_CATEGORY = 0.9  # a successor lies in a liked category with this probability
LENGTHS = (24, 64)
N_TRAIN, N_EVAL = 1500, 200


def event_category(event_id: int | np.ndarray) -> int | np.ndarray:
    return event_id // EVENTS_PER_CATEGORY


def make_world(rng: np.random.Generator) -> dict:
    """Per type: liked categories and, per event, 4 successors (the chain's support)."""
    types = []
    for _ in range(N_TYPES):
        liked = np.sort(rng.choice(N_CATEGORIES, size=LIKED_CATEGORIES, replace=False))
        liked_events = np.concatenate([np.arange(c * EVENTS_PER_CATEGORY, (c + 1) * EVENTS_PER_CATEGORY) for c in liked])
        successors = np.empty((N_EVENTS, len(SUCCESSOR_PROBS)), dtype=np.int64)
        for e in range(N_EVENTS):
            picks: list[int] = []
            while len(picks) < len(SUCCESSOR_PROBS):
                pool = liked_events if rng.random() < IN_LIKED_CATEGORY else np.arange(N_EVENTS)
                candidate = int(rng.choice(pool))
                if candidate != e and candidate not in picks:
                    picks.append(candidate)
            successors[e] = picks
        types.append({"liked_categories": liked.tolist(), "liked_events": liked_events, "successors": successors})
    return {"types": types}


def sample_sequence(world: dict, user_type: int, rng: np.random.Generator) -> list[int]:
    t = world["types"][user_type]
    length = int(rng.integers(LENGTHS[0], LENGTHS[1] + 1))
    event = int(rng.choice(t["liked_events"]))
    events = [event]
    for _ in range(length - 1):
        event = int(t["successors"][event][rng.choice(len(SUCCESSOR_PROBS), p=SUCCESSOR_PROBS)])
        events.append(event)
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/assets/events")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from posttrain.datasets.token_files import write_token_file

    rng = np.random.default_rng(args.seed)
    world = make_world(rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_types = rng.integers(N_TYPES, size=N_TRAIN)
    train = [sample_sequence(world, int(t), rng) for t in train_types]
    write_token_file(out / "train.npy", train)
    eval_types = rng.integers(N_TYPES, size=N_EVAL)
    with open(out / "eval.jsonl", "w") as f:
        f.writelines(
            json.dumps({"input_ids": sample_sequence(world, int(t), rng), "user_type": int(t)}) + "\n" for t in eval_types
        )
    summary = {
        "seed": args.seed,
        "n_events": N_EVENTS,
        "events_per_category": EVENTS_PER_CATEGORY,
        "successor_probs": SUCCESSOR_PROBS,
        "lengths": LENGTHS,
        "types": [{"liked_categories": t["liked_categories"]} for t in world["types"]],
    }
    (out / "world.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {N_TRAIN} train and {N_EVAL} eval sequences to {out}")


if __name__ == "__main__":
    main()
