"""A FlexAttention ``BlockMask`` from a ``mask_mod``, built without torch.compile, one band of query rows at a time.

``torch.compile(create_block_mask)`` is torch's way to avoid materialising the ``[Q, KV]`` mask, but its cold
compile can take minutes or hang at some lengths (pytorch/pytorch#182060; on one H200 with torch 2.11 the first
forward over 16384-position packed rows, which compiled it, took 2.5-4 minutes: BENCHMARKS.md, issue 14), and it
compiles again whenever grad mode changes (a no-grad scoring pass, then a training step). The eager
``create_block_mask`` materialises the whole mask at once. Here the ``mask_mod`` is evaluated on broadcast index
tensors (as the SDPA backend does) for a band of query blocks at a time, at most ``BAND_ELEMENTS`` booleans, and
each band is reduced to per-block counts: a block with every position allowed is "full" (the kernel skips its
mask_mod), one with some is "partial", one with none is skipped. Exact for any mask_mod; a few elementwise kernels
per band, once per forward.

Causal attention within documents (the packed rows of SFT and GRPO), in a sliding window or not, needs none of
that: ``document_block_mask`` reads the blocks from each block's document ids (16384 positions on a 2-core CPU:
5 ms instead of 1.7 s; on one H200 the evaluated mask took 14.5 ms a forward, GPU tier run 7).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from posttrain.models.common.shared_prompts import prompt_of

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


def document_block_mask(
    document_ids: torch.Tensor, seq_len: int, mask_mod: MaskMod, *, window: int | None = None,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The BlockMask of causal attention within documents (``mask_mod``: causal AND same document id, AND with
    ``window`` ``q - kv < window``) from the document ids of each block, without evaluating the ``[S, S]`` mask:
    O((S / block_size)^2) work, not O(S^2).

    A KV block is skipped when it lies after the query block, entirely beyond the window, or when the KV block's
    id range meets neither the query block's ids nor the shared prompts those ids see (``shared_prompts``; ranges
    taken apart for negative ids, the padding, which attends only to itself, so only within its own block); it is
    full when it lies before the query block, entirely inside the window, and holds only ids every query of the
    block sees: the query block's single id and its shared prompt, or the single shared prompt of all its
    queries. Every other block is partial, where the kernel applies ``mask_mod`` to each position. Packed rows of
    ordinary documents (ids counting up along the row, padding -1 at the end) get exactly
    ``block_mask_from_mask_mod``'s blocks; shared-prompt rows get its full blocks and a superset of its partial
    blocks (a few more near group boundaries); any layout gets no wrongly full or skipped block."""
    batch = document_ids.shape[0]
    n_blocks = -(-seq_len // block_size)
    ids = document_ids[:, :seq_len]
    if n_blocks * block_size > seq_len:  # the last block's tail repeats the last id: no new id, never full
        ids = torch.cat([ids, ids[:, -1:].expand(batch, n_blocks * block_size - seq_len)], dim=1)
    blocks = ids.reshape(batch, n_blocks, block_size)
    top = torch.iinfo(blocks.dtype).max
    negative = blocks < 0
    prompts = prompt_of(blocks)

    def id_range(ids: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # empty: low > high
        return (torch.where(members, ids, top).amin(-1), torch.where(members, ids, -top).amax(-1))

    def ranges_meet(q: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (q[0][:, :, None] <= kv[1][:, None, :]) & (kv[0][:, None, :] <= q[1][:, :, None])  # [B, q, kv]

    block = torch.arange(n_blocks, device=blocks.device)
    q_block, kv_block = block[:, None], block[None, :]
    own, pads = id_range(blocks, ~negative), id_range(blocks, negative)
    # a query sees its own document, the prompt its document shares (if any), and padding only itself (its block)
    may_share = (ranges_meet(own, own) | ranges_meet(id_range(prompts, ~negative), own)
                 | (ranges_meet(pads, pads) & (q_block == kv_block)))
    whole = (block + 1) * block_size <= seq_len

    def single(values: torch.Tensor) -> torch.Tensor:  # one non-negative value over a whole block
        return (values.amin(-1) == values.amax(-1)) & (values[:, :, 0] >= 0) & whole

    # Full: a query block of one document (id a, shared prompt p, p = a when none) over a KV block holding only a
    # and p (a prompt's end and a completion's start share blocks), or a query block whose every id shares the
    # prompt p over a KV block of p alone.
    kv_low, kv_high = blocks.amin(-1), blocks.amax(-1)
    two_valued = ((blocks == kv_low[..., None]) | (blocks == kv_high[..., None])).all(-1) & (kv_low >= 0) & whole
    a, p = blocks[:, :, :1], prompts[:, :, :1]  # [B, q block, 1]

    def seen(values: torch.Tensor) -> torch.Tensor:  # [B, q, kv]: the KV block's value is a or p of the q block
        return (values[:, None, :] == a) | (values[:, None, :] == p)

    own_document = single(blocks)[:, :, None] & two_valued[:, None, :] & seen(kv_low) & seen(kv_high)
    shared_prompt = single(prompts)[:, :, None] & single(blocks)[:, None, :] & (kv_low[:, None, :] == p)
    full = (kv_block < q_block) & (own_document | shared_prompt)
    reachable = kv_block <= q_block
    if window is not None:  # q - kv over a block pair: from (q_block - kv_block) * B - (B - 1) to ... + (B - 1)
        reachable &= (q_block - kv_block) * block_size - (block_size - 1) < window
        full &= (q_block - kv_block) * block_size + (block_size - 1) < window
    partial = reachable & may_share & ~full
    kv_num, kv_indices = _ordered(partial[:, None])
    full_num, full_indices = _ordered(full[:, None])
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


__all__ = ["BAND_ELEMENTS", "BLOCK_SIZE", "block_mask_from_mask_mod", "document_block_mask"]
