"""A preallocated key/value cache for incremental decoding with posttrain's decoders.

One ``[B, n_kv_heads, max_len, head_dim]`` tensor pair per layer; the slot of a token is its position, so a
row's cache holds its tokens at slots ``0 .. position``. ``model(ids, position_ids=..., kv_cache=cache)``:

* ``position_ids=None`` (a prefill from slot 0 of every row): the forward is the training forward (same
  masks, same kernels) and writes k/v into slots ``0 .. S-1``. Prompts of different lengths are
  right-padded; the padding's k/v land in slots that the row's later tokens overwrite before anyone
  attends to them.
* ``position_ids [B, S]`` (decode: S = 1, one new token per row, each at its own position): k/v are written
  at those slots and each query attends to the slots ``<= its position`` (ANDed with the layer kind's extra
  mask_mod, e.g. a sliding window) through a dense boolean mask over the first ``max(position) + 1``
  slots. Every slot below a row's position must have been written before.

Sliding-window layers keep full-length caches (no ring buffer): simple, and correct for any window.
"""

from __future__ import annotations

import torch

from posttrain.models.common.attention import MaskMod, _compose


class KVCache:
    """Keys and values of every layer for ``batch`` rows of up to ``max_len`` positions."""

    def __init__(
        self,
        n_layers_or_names: int | list[str],
        *,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        names = (
            [str(i) for i in range(n_layers_or_names)]
            if isinstance(n_layers_or_names, int)
            else list(n_layers_or_names)
        )
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.k = {name: torch.zeros(shape, device=device, dtype=dtype) for name in names}
        self.v = {name: torch.zeros(shape, device=device, dtype=dtype) for name in names}
        # set by `begin_forward` for the forward in flight
        self._positions: torch.Tensor | None = None  # [B, S]; None: prefill from slot 0
        self._rows: torch.Tensor | None = None  # [B, 1]: row indices for writes at per-row positions
        self._attend_len = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, batch: int, max_len: int,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for a posttrain ``Transformer`` (on its parameters' device / dtype by default)."""
        weight = model.tok_embeddings.weight
        args = model.args
        return cls(
            list(model.layers.keys()), batch=batch, max_len=max_len, n_kv_heads=args.n_kv_heads,
            head_dim=args.head_dim, device=device or weight.device, dtype=dtype or weight.dtype,
        )

    @property
    def batch(self) -> int:
        return next(iter(self.k.values())).shape[0]

    def layer(self, name: str) -> LayerKVCache:
        return LayerKVCache(self, self.k[name], self.v[name])

    def begin_forward(self, batch: int, seq_len: int, position_ids: torch.Tensor | None) -> None:
        """Record where this forward's tokens go (called by the model before its layers run)."""
        if batch != self.batch:
            raise ValueError(f"the batch has {batch} rows but the KV cache holds {self.batch}")
        if position_ids is None:
            attend_len = seq_len
        else:
            attend_len = int(position_ids.max()) + 1  # one host sync per forward
        if attend_len > self.max_len:
            raise ValueError(f"position {attend_len - 1} is past the KV cache's max_len {self.max_len}")
        self._positions = position_ids
        self._rows = None if position_ids is None else torch.arange(batch, device=position_ids.device)[:, None]
        self._attend_len = attend_len

    def attention_mask(self, position_ids: torch.Tensor, extra_mask_mod: MaskMod | None) -> torch.Tensor:
        """Dense ``[B, 1, S, T]`` mask: query at ``position_ids[b, s]`` may see slot ``t`` (causal AND extra)."""
        batch, seq_len = position_ids.shape
        mask_mod = _compose(None, extra_mask_mod)
        device = position_ids.device
        b = torch.arange(batch, device=device).view(batch, 1, 1)
        h = torch.zeros((), dtype=torch.long, device=device)
        q_idx = position_ids.view(batch, seq_len, 1)
        kv_idx = torch.arange(self._attend_len, device=device).view(1, 1, -1)
        return mask_mod(b, h, q_idx, kv_idx).unsqueeze(1)

    def store(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store rotated k, v ``[B, Hkv, S, D]`` into one layer's cache tensors; the k, v the queries attend to."""
        if self._positions is None:
            seq_len = k.shape[2]
            k_cache[:, :, :seq_len] = k
            v_cache[:, :, :seq_len] = v
            return k, v
        # indexed assignment (index_put_), not scatter_: compiled, it writes the cache in place, where scatter_
        # had inductor copy the whole cache of the layer around the write at every decode step
        k_cache[self._rows, :, self._positions] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[self._rows, :, self._positions] = v.transpose(1, 2).to(v_cache.dtype)
        return k_cache[:, :, : self._attend_len], v_cache[:, :, : self._attend_len]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a LongTensor of row indices), e.g. to drop finished sequences."""
        for name in self.k:
            self.k[name] = self.k[name].index_select(0, rows)
            self.v[name] = self.v[name].index_select(0, rows)


class LayerKVCache:
    """One layer's view of a ``KVCache``; what ``Attention.forward`` receives. It holds the layer's tensors, not its
    name: a compiled block then guards on tensor shapes alone, so every layer shares one graph per shape."""

    __slots__ = ("cache", "k", "v")

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache = cache
        self.k = k
        self.v = v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.store(self.k, self.v, k, v)
