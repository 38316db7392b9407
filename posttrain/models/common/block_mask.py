"""A FlexAttention ``BlockMask`` from a ``mask_mod``, built without torch.compile, one band of query rows at a time.

``torch.compile(create_block_mask)`` is torch's way to avoid materialising the ``[Q, KV]`` mask, but its cold
compile can take minutes or hang at some lengths (pytorch/pytorch#182060; on one H200 with torch 2.11 the first
forward over 16384-position packed rows, which compiled it, took 2.5-4 minutes: BENCHMARKS.md, issue 14), and it
compiles again whenever grad mode changes (a no-grad scoring pass, then a training step). The eager ``create_block_mask`` materialises the whole
mask at once. Here the ``mask_mod`` is evaluated on broadcast index tensors (as the SDPA backend does) for a band
of query blocks at a time, at most ``BAND_ELEMENTS`` booleans, and each band is reduced to per-block counts: a
block with every position allowed is "full" (the kernel skips its mask_mod), one with some is "partial", one with
none is skipped. Exact for any mask_mod; a few elementwise kernels per band, once per forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128
BAND_ELEMENTS = 2**27  # booleans of mask evaluated at once (128 MiB)

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: how many KV blocks are set, and their indices first (BlockMask's layout)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def block_mask_from_mask_mod(
    mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device | str, *,
    block_size: int = BLOCK_SIZE, band_elements: int = BAND_ELEMENTS,
) -> BlockMask:
    """The BlockMask of ``mask_mod`` (head-independent, as ``create_block_mask(mask_mod, batch, None, ...)``) for
    ``batch`` rows of ``q_len`` queries over ``kv_len`` keys. ``mask_mod`` must broadcast over index tensors."""
    device = torch.device(device)
    q_blocks = -(-q_len // block_size)
    kv_blocks = -(-kv_len // block_size)
    kv_padded = kv_blocks * block_size
    rows = max(block_size, band_elements // (batch * kv_padded) // block_size * block_size)
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros((), dtype=torch.long, device=device)
    kv_idx = torch.arange(kv_padded, device=device).view(1, 1, 1, kv_padded)
    kv_valid = kv_idx < kv_len
    kv_idx = kv_idx.clamp(max=kv_len - 1)  # the padded tail evaluates a real position, then is masked out
    partial_bands, full_bands = [], []
    for q0 in range(0, q_blocks * block_size, rows):
        q1 = min(q0 + rows, q_blocks * block_size)
        q_idx = torch.arange(q0, q1, device=device).view(1, 1, q1 - q0, 1)
        allowed = mask_mod(b, h, q_idx.clamp(max=q_len - 1), kv_idx) & (q_idx < q_len) & kv_valid
        allowed = allowed.expand(allowed.shape[0], 1, q1 - q0, kv_padded)  # a mask_mod may ignore b
        counts = allowed.reshape(allowed.shape[0], 1, (q1 - q0) // block_size, block_size, kv_blocks, block_size)
        counts = counts.sum(dim=(3, 5), dtype=torch.int32)
        partial_bands.append((counts > 0) & (counts < block_size * block_size))
        full_bands.append(counts == block_size * block_size)
    partial = torch.cat(partial_bands, dim=2).expand(batch, 1, q_blocks, kv_blocks)
    full = torch.cat(full_bands, dim=2).expand(batch, 1, q_blocks, kv_blocks)
    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


__all__ = ["BAND_ELEMENTS", "BLOCK_SIZE", "block_mask_from_mask_mod"]
