"""Preference pairs: chat-template tokenization with answer-only masks, [chosen, rejected] packing, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.datasets.errors import BadRowError
from posttrain.datasets.preference import (
    PreferenceDataLoader,
    load_preference_pairs,
    pack_pairs,
    tokenize_preference_row,
)
from posttrain.datasets.tokenizer import HFTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer(ASSETS / "tokenizer")


def _row(i: int = 0) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
        "chosen": [{"role": "assistant", "content": f"The answer is {i + 2}."}],
        "rejected": [{"role": "assistant", "content": f"The answer is {i + 3}."}],
    }


def test_chat_pair_is_rendered_by_the_template_and_trains_only_the_answer(tokenizer: HFTokenizer) -> None:
    pair = tokenize_preference_row(_row(), tokenizer, index=0, where="x:1")
    full = tokenizer.hf.apply_chat_template(_row()["prompt"] + _row()["chosen"], tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert pair.chosen_ids.tolist() == list(full)
    trained = tokenizer.decode(pair.chosen_ids[pair.chosen_mask].tolist())
    assert "The answer is 2." in trained and "What is" not in trained
    assert (~pair.chosen_mask).sum() == (~pair.rejected_mask).sum()  # same prompt, untrained in both


def test_text_pair_and_bad_rows(tokenizer: HFTokenizer) -> None:
    pair = tokenize_preference_row({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, tokenizer, index=0, where="x:1")
    assert pair.chosen_mask[-1] and not pair.chosen_mask[0]
    with pytest.raises(BadRowError, match="x:2"):
        tokenize_preference_row({"prompt": "2+2=", "chosen": "4"}, tokenizer, index=0, where="x:2")
    with pytest.raises(BadRowError, match="both be strings"):
        tokenize_preference_row({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
                                tokenizer, index=0, where="x:3")


def test_packing_lays_pairs_side_by_side_with_sequence_ids(tokenizer: HFTokenizer) -> None:
    pairs = [tokenize_preference_row(_row(i), tokenizer, index=i, where=f"x:{i}") for i in range(3)]
    length = len(pairs[0])
    seq_len = 2 * length + 3  # two pairs per row
    batch = pack_pairs(pairs, seq_len=seq_len, rows=2, pad_id=tokenizer.pad_id)
    assert batch["n_targets"] == 3 and batch["pair_ids"].tolist() == [0, 1, 2]
    flat = batch["labels"].reshape(-1)  # the labelled positions travel with the batch (no device sync in the loss)
    assert batch["target_index"].tolist() == [i for i in range(flat.numel()) if flat[i] != -100]
    seq = batch["sequence_ids"]
    n_c = len(pairs[0].chosen_ids)
    assert seq[0, :n_c].eq(0).all() and seq[0, n_c:length].eq(1).all() and seq[0, length : 2 * length].min() == 2
    assert seq[0, 2 * length :].eq(-1).all() and batch["labels"][0, 2 * length :].eq(-100).all()
    assert seq[1, : len(pairs[2])].max() == 5  # the third pair opens the second row
    assert batch["position_ids"][0, n_c].item() == 0  # positions restart for the rejected document
    assert batch["document_ids"][0, :length].unique().tolist() == [0, 1]
    # Every sequence ends at its own last token, and no label crosses from chosen into rejected.
    ends = batch["sequence_ends"]
    assert ends.tolist()[:2] == [n_c - 1, length - 1]
    assert batch["labels"].view(-1)[ends].eq(-100).all()
    labelled = batch["labels"] != -100
    assert labelled.sum() == sum(int(p.chosen_mask[1:].sum() + p.rejected_mask[1:].sum()) for p in pairs)


def test_loader_counts_pairs_resumes_exactly_and_shards(tmp_path: Path, tokenizer: HFTokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(10)))
    pairs, stats = load_preference_pairs(str(path), tokenizer, seq_len=256)
    assert len(pairs) == 10 and stats["rows"] == 10

    def loader(**kw) -> PreferenceDataLoader:
        return PreferenceDataLoader(pairs, seq_len=128, micro_batch_size=1, pad_id=tokenizer.pad_id, seed=3, **kw)

    a = loader()
    first = [next(a) for _ in range(4)]
    state = a.state_dict()
    rest = [next(a)["pair_ids"].tolist() for _ in range(6)]
    b = loader()
    b.load_state_dict(state)
    assert [next(b)["pair_ids"].tolist() for _ in range(6)] == rest
    seen = [i for mb in first for i in mb["pair_ids"].tolist()] + [i for r in rest for i in r]
    assert sorted(seen[:10]) == list(range(10))  # one epoch holds every pair once

    rank1 = loader(dp_rank=1, dp_world_size=2)
    owned = {i for _ in range(6) for i in next(rank1)["pair_ids"].tolist()}
    assert owned == {1, 3, 5, 7, 9}
    assert sorted(i for mb in rank1.batches_once() for i in mb["pair_ids"].tolist()) == [1, 3, 5, 7, 9]
    assert isinstance(first[0]["input_ids"], torch.Tensor) and first[0]["input_ids"].shape == (1, 128)


def test_overlong_pairs_are_truncated_or_dropped(tmp_path: Path, tokenizer: HFTokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    long = _row(0)
    long["chosen"][0]["content"] = "word " * 200
    path.write_text(json.dumps(long) + "\n" + json.dumps(_row(1)) + "\n")
    kept, stats = load_preference_pairs(str(path), tokenizer, seq_len=64, overlong="drop")
    assert len(kept) == 1 and stats["dropped"] == 1
    cut, _ = load_preference_pairs(str(path), tokenizer, seq_len=64, overlong="truncate")
    assert len(cut) == 2 and all(len(p) <= 64 for p in cut)
