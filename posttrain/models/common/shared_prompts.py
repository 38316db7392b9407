"""Document ids for completions that share one copy of their prompt in a packed row (GRPO's packed passes,
`posttrain/rl/packed_batches.py`).

A group's prompt is laid out once, then each of its completions; a completion sees the prompt before it and its
own earlier tokens, never another completion. The relation lives in the document ids, so every attention backend
reads it from the tensor it already gets: an id at or above ``SHARED_FLAG`` encodes (group, member), member 0
being the group's prompt and members 1, 2, ... its completions. Ordinary ids (packed SFT documents 0, 1, 2, ...)
and padding (negative) mean what they always meant.
"""

from __future__ import annotations

import torch

SHARED_FLAG = 1 << 40
MEMBER_BITS = 20
GROUP_LIMIT = 1 << (40 - MEMBER_BITS)


def shared_document_id(group: int, member: int) -> int:
    """The id of member ``member`` (0: the prompt, 1...: its completions) of prompt group ``group`` in one row."""
    if not (0 <= group < GROUP_LIMIT and 0 <= member < 1 << MEMBER_BITS):
        raise ValueError(f"shared_document_id: group {group} / member {member} outside [0, {GROUP_LIMIT}) / "
                         f"[0, {1 << MEMBER_BITS})")
    return SHARED_FLAG | group << MEMBER_BITS | member


def prompt_of(document_ids: torch.Tensor) -> torch.Tensor:
    """Per position: the id of the shared prompt its document sees besides itself (for a shared prompt's tokens,
    its own id); for any other id, that id."""
    shared = document_ids >= SHARED_FLAG
    return torch.where(shared, (document_ids >> MEMBER_BITS) << MEMBER_BITS, document_ids)


__all__ = ["GROUP_LIMIT", "MEMBER_BITS", "SHARED_FLAG", "prompt_of", "shared_document_id"]

