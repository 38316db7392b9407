"""block_mask_from_mask_mod builds the same BlockMask as torch's create_block_mask (which FlexAttention's own tests
trust), band by band, without torch.compile: same partial and full blocks, same attention output."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from posttrain.models.common.attention import FlexBackend, _compose, sliding_window_mask_mod
from posttrain.models.common.block_mask import block_mask_from_mask_mod, document_block_mask
from posttrain.models.common.shared_prompts import shared_document_id


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


@pytest.mark.parametrize("batch, seq_len, n_docs, padding", [
    (2, 300, 3, 17),  # length not a multiple of the block, a padding tail
    (1, 1024, 2, 0),  # long documents: full blocks
    (3, 1000, 40, 130),  # short documents, padding longer than a block
    (1, 128, 1, 0),  # a single block
    (2, 777, 7, 200),
])
def test_document_block_mask_equals_the_evaluated_mask_on_packed_rows(batch, seq_len, n_docs, padding):
    docs = _packed_document_ids(batch, seq_len, n_docs=n_docs, padding=padding, seed=seq_len + n_docs)
    mask_mod = _compose(docs, None)
    evaluated = block_mask_from_mask_mod(mask_mod, batch, seq_len, seq_len, "cpu")
    built = document_block_mask(docs, seq_len, mask_mod)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(built, name), getattr(evaluated, name)), name
    if seq_len >= 1024:
        assert built.full_kv_num_blocks.sum() > 0


def test_document_block_mask_on_any_ids_keeps_every_allowed_block_and_the_output():
    """Ids in no order (not what packing makes): more partial blocks than needed, never a full or skipped one
    that is wrong, so FlexAttention's output is the same."""
    g = torch.Generator().manual_seed(3)
    batch, seq_len = 2, 700
    docs = torch.randint(-2, 5, (batch, seq_len), generator=g)
    docs[:, 128:256] = 3  # one block of a single id among the random ones
    mask_mod = _compose(docs, None)
    evaluated = block_mask_from_mask_mod(mask_mod, batch, seq_len, seq_len, "cpu")
    built = document_block_mask(docs, seq_len, mask_mod)
    (built_partial, built_full), (want_partial, want_full) = (
        [_block_sets(m, full) for full in (False, True)] for m in (built, evaluated))
    assert built_full == want_full
    assert want_partial <= built_partial
    q = torch.randn(batch, 2, seq_len, 16, generator=g)
    k, v = torch.randn(2, batch, 2, seq_len, 16, generator=g)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=built), flex_attention(q, k, v, block_mask=evaluated))


def _block_sets(mask, full: bool) -> set[tuple[int, int, int]]:
    num = mask.full_kv_num_blocks if full else mask.kv_num_blocks
    idx = mask.full_kv_indices if full else mask.kv_indices
    return {(b, q, int(idx[b, 0, q, j])) for b in range(num.shape[0]) for q in range(num.shape[2])
            for j in range(int(num[b, 0, q]))}


@pytest.mark.parametrize("seq_len, window, n_docs", [(700, 100, 4), (1024, 300, 2), (900, 128, 30), (500, 1000, 3)])
def test_document_block_mask_with_a_sliding_window(seq_len, window, n_docs):
    """Sliding-window layers (Gemma 3, GPT-OSS) on packed rows: the same full blocks as the evaluated mask, no
    allowed block missing (an extra partial one at most where a block pair shares a document only outside the
    window), the same attention output; FlexBackend takes this path for the model's sliding mask_mod."""
    batch = 2
    docs = _packed_document_ids(batch, seq_len, n_docs=n_docs, padding=70, seed=window)
    sliding = sliding_window_mask_mod(window)
    mask_mod = _compose(docs, sliding)
    evaluated = block_mask_from_mask_mod(mask_mod, batch, seq_len, seq_len, "cpu")
    built = FlexBackend().build_mask(docs, batch=batch, seq_len=seq_len, device=torch.device("cpu"),
                                     extra_mask_mod=sliding)
    (built_partial, built_full), (want_partial, want_full) = (
        [_block_sets(m, full) for full in (False, True)] for m in (built, evaluated))
    assert built_full == want_full
    assert want_partial <= built_partial
    assert len(built_partial - want_partial) <= len(want_partial) // 10 + 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 2, seq_len, 16, generator=g)
    k, v = torch.randn(2, batch, 2, seq_len, 16, generator=g)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=built), flex_attention(q, k, v, block_mask=evaluated))


def test_build_mask_refuses_document_ids_that_do_not_cover_the_batch():
    docs = _packed_document_ids(1, 256, n_docs=2, padding=0, seed=0)
    with pytest.raises(ValueError, match=r"do not cover 2 rows of 256 positions"):
        FlexBackend().build_mask(docs, batch=2, seq_len=256, device=torch.device("cpu"))


def test_a_wrapped_window_mask_mod_is_evaluated_not_read_from_blocks():
    import functools

    sliding = sliding_window_mask_mod(50)

    @functools.wraps(sliding)
    def wider(b, h, q_idx, kv_idx):  # keeps the wrapped function's attributes, means something else
        return q_idx - kv_idx < 400

    docs = _packed_document_ids(1, 512, n_docs=1, padding=0, seed=1)
    built = FlexBackend().build_mask(docs, batch=1, seq_len=512, device=torch.device("cpu"), extra_mask_mod=wider)
    evaluated = block_mask_from_mask_mod(_compose(docs, wider), 1, 512, 512, "cpu")
    assert torch.equal(built.to_dense(), evaluated.to_dense())


def test_padding_attends_only_to_itself_and_costs_one_block_per_padded_block():
    # a row of one short document and a long padding tail (GRPO's last packed row of a minibatch): as one causal
    # "document" the tail would need ~n^2 / 2 blocks; attending only to itself it needs its diagonal blocks
    seq_len, real = 2048, 200
    docs = torch.full((1, seq_len), -1)
    docs[0, :real] = 0
    mask_mod = _compose(docs, None)
    built = document_block_mask(docs, seq_len, mask_mod)
    evaluated = block_mask_from_mask_mod(mask_mod, 1, seq_len, seq_len, "cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(built, name), getattr(evaluated, name)), name
    padded_blocks = list(range(real // 128, seq_len // 128))
    assert built.full_kv_num_blocks[0, 0, padded_blocks].sum() == 0
    assert built.kv_num_blocks[0, 0, padded_blocks[1:]].tolist() == [1] * (len(padded_blocks) - 1)
    idx = torch.arange(seq_len)
    dense = mask_mod(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros((), dtype=torch.long),
                     idx.view(1, 1, seq_len, 1), idx.view(1, 1, 1, seq_len))[0, 0]
    assert torch.equal(dense[real:, real:], torch.eye(seq_len - real, dtype=torch.bool))
    assert not dense[real:, :real].any() and not dense[:real, real:].any()
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, seq_len, 16, generator=g)
    out = flex_attention(q, k, v, block_mask=built)
    torch.testing.assert_close(out[:, :, real:], v[:, :, real:])  # a position alone with itself returns its value


@pytest.mark.parametrize("window", [None, 200])
def test_document_block_mask_on_shared_prompt_rows_keeps_the_full_blocks_and_the_output(window):
    # GRPO's shared-prompt rows: per group a prompt, then its completions, each seeing the prompt and itself
    g = torch.Generator().manual_seed(4)
    ids: list[int] = []
    group = 0
    while len(ids) < 1900:
        ids += [shared_document_id(group, 0)] * int(torch.randint(20, 300, (1,), generator=g))
        for member in range(1, int(torch.randint(2, 6, (1,), generator=g))):
            ids += [shared_document_id(group, member)] * int(torch.randint(1, 200, (1,), generator=g))
        group += 1
    seq_len = 2000
    docs = torch.tensor((ids + [-1] * seq_len)[:seq_len])[None]
    extra = None if window is None else sliding_window_mask_mod(window)
    mask_mod = _compose(docs, extra)
    evaluated = block_mask_from_mask_mod(mask_mod, 1, seq_len, seq_len, "cpu")
    built = document_block_mask(docs, seq_len, mask_mod, window=window)
    (built_partial, built_full), (want_partial, want_full) = (
        [_block_sets(m, full) for full in (False, True)] for m in (built, evaluated))
    assert built_full == want_full and want_partial <= built_partial
    if window is None:
        assert len(want_full) > 0  # completions' blocks over a whole prompt block
    q, k, v = torch.randn(3, 1, 2, seq_len, 16, generator=g)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=built), flex_attention(q, k, v, block_mask=evaluated))
    # a completion sees its prompt and itself, not the group's other completions nor another group
    idx = torch.arange(seq_len)
    dense = mask_mod(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros((), dtype=torch.long),
                     idx.view(1, 1, seq_len, 1), idx.view(1, 1, 1, seq_len))[0, 0]
    member = docs[0]
    first, second = shared_document_id(0, 1), shared_document_id(0, 2)
    q_pos = int((member == second).nonzero()[0])
    if window is None:
        assert dense[q_pos, member == shared_document_id(0, 0)].all()
    assert not dense[q_pos, member == first].any()
    assert not dense[q_pos, member == shared_document_id(1, 0)].any()
