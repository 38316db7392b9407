"""A KV cache of fixed shape for the decode loop: one row per sequence slot, every step attends to all slots.

``SlotKVCache`` is a ``KVCache`` whose decode forwards never ask the host how far to attend: the mask covers
all ``max_len`` slots (a slot past a row's position is masked), so a decode step has the same shapes and
addresses every time and can be captured as a CUDA graph. ``rows(n, length)`` is the cache of the first ``n``
rows and ``length`` positions (views of the same memory: a graph captured on it stays valid while the rows
change their content); the caller guarantees that no row feeds a position at or past ``length``.

Rows are filled by copying: a prompt is prefilled once into a small ordinary ``KVCache`` and its keys and
values are copied into every slot that samples from it (``write_prefix``); ``move_rows`` packs the live rows
to the front when the batch shrinks.
"""

from __future__ import annotations

import torch

from posttrain.models.common.kv_cache import KVCache


class SlotKVCache(KVCache):
    """``KVCache`` for decoding at per-row positions with static shapes (no host synchronisation)."""

    def begin_forward(self, batch: int, seq_len: int, position_ids: torch.Tensor | None) -> None:
        if position_ids is None:
            raise ValueError("a SlotKVCache is filled by write_prefix, not by a prefill forward")
        if batch != self.batch:
            raise ValueError(f"the batch has {batch} rows but the KV cache holds {self.batch}")
        self._positions = position_ids
        self._rows = torch.arange(batch, device=position_ids.device)[:, None]
        self._attend_len = self.max_len

    def rows(self, n: int, length: int | None = None) -> SlotKVCache:
        """The cache of rows ``0 .. n-1`` and positions ``0 .. length-1`` (the same memory)."""
        length = self.max_len if length is None else length
        if n == self.batch and length == self.max_len:
            return self
        view = SlotKVCache.__new__(SlotKVCache)
        view.max_len = length
        view.k = {name: t[:n, :, :length] for name, t in self.k.items()}
        view.v = {name: t[:n, :, :length] for name, t in self.v.items()}
        view._positions, view._rows, view._attend_len = None, None, 0
        return view

    def write_prefix(self, slots: torch.Tensor, k: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
                     source_rows: torch.Tensor, length: int) -> None:
        """Copy positions ``0 .. length-1`` of rows ``source_rows`` of another cache's per-layer ``k`` / ``v``
        (``[rows, Hkv, >= length, D]``) into this cache's rows ``slots``."""
        for name in self.k:
            self.k[name][slots, :, :length] = k[name][source_rows, :, :length]
            self.v[name][slots, :, :length] = v[name][source_rows, :, :length]

    def move_rows(self, source_rows: torch.Tensor) -> None:
        """Rows ``source_rows`` become rows ``0 .. len(source_rows)-1`` (in place: addresses do not change)."""
        n = source_rows.numel()
        for name in self.k:
            self.k[name][:n] = self.k[name].index_select(0, source_rows)
            self.v[name][:n] = self.v[name].index_select(0, source_rows)
