"""Test helpers for the SFT data pipeline: a character-level fake tokenizer and row/file writers.

The fake tokenizer has the HFTokenizer data interface (tokenize_messages / tokenize_prompt_completion /
tokenize_text, eos_id, pad_id) and is exactly invertible (token = ord(char) + 10), so tests can read back
which rows ended up in which packed documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

EOS = 1
PAD = 0
ROLE_TOKENS = {"system": 2, "user": 3, "assistant": 4, "tool": 5, "developer": 6}
_OFFSET = 10


class FakeTokenizer:
    eos_id = EOS
    pad_id = PAD

    def encode(self, text: str) -> list[int]:
        return [ord(c) + _OFFSET for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(t) - _OFFSET) for t in ids if int(t) >= _OFFSET)

    def tokenize_messages(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            body = self.encode(m["content"] or "") + [EOS]
            ids += [ROLE_TOKENS[m["role"]]] + body
            mask += [False] + [m["role"] == "assistant"] * len(body)
        return ids, mask

    def tokenize_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        p, c = self.encode(prompt), self.encode(completion) + [EOS]
        return p + c, [False] * len(p) + [True] * len(c)

    def tokenize_text(self, text: str) -> tuple[list[int], list[bool]]:
        ids = self.encode(text) + [EOS]
        return ids, [True] * len(ids)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def documents_of(batch: dict[str, Any]) -> list[np.ndarray]:
    """The token ids of every real document in a batch, row by row."""
    docs = []
    ids, doc_ids = batch["input_ids"].numpy(), batch["document_ids"].numpy()
    for row_ids, row_docs in zip(ids, doc_ids):
        for d in range(int(row_docs.max()) + 1):
            docs.append(row_ids[row_docs == d])
    return docs


def texts_of(batches: list[dict[str, Any]], tokenizer: FakeTokenizer | None = None) -> list[str]:
    """The decoded text of every document in the batches (text rows decode to their `text`)."""
    tok = tokenizer or FakeTokenizer()
    return [tok.decode(doc) for b in batches for doc in documents_of(b)]


def random_token_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = 100, seed: int = 0) -> list[dict]:
    """`n` collated micro-batches of random ids and labels, one document per row: a Trainer's data_loader in tests."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
         "labels": torch.randint(0, vocab, (batch, seq), generator=g),
         "position_ids": torch.arange(seq).expand(batch, seq), "document_ids": torch.zeros(batch, seq, dtype=torch.long)}
        for _ in range(n)
    ]
