"""block_mask_from_mask_mod builds the same BlockMask as torch's create_block_mask (which FlexAttention's own tests
trust), band by band, without torch.compile: same partial and full blocks, same attention output."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from posttrain.models.common.attention import _compose, sliding_window_mask_mod
from posttrain.models.common.block_mask import block_mask_from_mask_mod


def _packed_document_ids(batch: int, seq_len: int, n_docs: int, padding: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randint(0, n_docs, (batch, seq_len), generator=g), dim=-1).values
    if padding:
        ids[:, -padding:] = -1  # the padding tail of a packed row (datasets/packing.py)
    return ids


@pytest.mark.parametrize(
    "batch, seq_len, window, band_elements",
    [
        (2, 300, None, 2**27),  # one band; length not a multiple of the block
        (1, 1000, 100, 128 * 512),  # several bands, a sliding window
        (3, 256, None, 1),  # one query block per band
        (2, 128, 16, 2**27),  # a single block
        (1, 1024, None, 2**27),  # two long documents: blocks inside one document are full
    ],
)
def test_same_blocks_and_output_as_create_block_mask(batch, seq_len, window, band_elements):
    docs = _packed_document_ids(batch, seq_len, n_docs=2, padding=17 if seq_len > 128 else 0, seed=seq_len)
    mask_mod = _compose(docs, sliding_window_mask_mod(window) if window else None)
    reference = create_block_mask(mask_mod, batch, None, seq_len, seq_len, device="cpu")
    built = block_mask_from_mask_mod(mask_mod, batch, seq_len, seq_len, "cpu", band_elements=band_elements)

    assert torch.equal(built.kv_num_blocks, reference.kv_num_blocks)
    assert torch.equal(built.full_kv_num_blocks, reference.full_kv_num_blocks)
    assert torch.equal(built.to_dense(), reference.to_dense())
    if seq_len >= 1024:  # documents span whole blocks: full blocks are found, not left partial
        assert built.full_kv_num_blocks.sum() > 0

    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 4, seq_len, 16, generator=g)
    k, v = torch.randn(2, batch, 2, seq_len, 16, generator=g)
    expected = flex_attention(q, k, v, block_mask=reference, enable_gqa=True)
    assert torch.equal(flex_attention(q, k, v, block_mask=built, enable_gqa=True), expected)


def test_a_mask_mod_without_batch_dependence_broadcasts_over_rows():
    causal = _compose(None, sliding_window_mask_mod(40))
    built = block_mask_from_mask_mod(causal, 3, 400, 400, "cpu")
    reference = create_block_mask(causal, 3, None, 400, 400, device="cpu")
    assert built.kv_num_blocks.shape == reference.kv_num_blocks.shape
    assert torch.equal(built.to_dense(), reference.to_dense())
