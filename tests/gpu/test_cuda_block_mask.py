"""Block masks at GRPO's packed length on the device: built in well under a second with no compilation (the
compiled create_block_mask took minutes cold at 16384 positions, BENCHMARKS.md issue 14), the same blocks as
torch's eager create_block_mask, and FlexAttention forward + backward through it equal to a dense-mask
reference."""

from __future__ import annotations

import time

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from posttrain.models.common.attention import FlexBackend, _compose, sdpa_attention
from posttrain.models.common.block_mask import block_mask_from_mask_mod, document_block_mask


def _packed_documents(seq_len: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < seq_len - 200:
        n = int(torch.randint(40, 250, (1,), generator=g))
        lengths.append(n)
        total += n
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((seq_len - total,), -1)])
    return ids[None].to(device)


def test_grpo_length_block_mask_is_fast_and_exact(device: torch.device, record_property) -> None:
    if device.type != "cuda":
        pytest.skip("FlexAttention's backward and the timing are CUDA checks")
    seq_len = 16384
    docs = _packed_documents(seq_len, device)
    mask_mod = _compose(docs, None)
    block_mask_from_mask_mod(mask_mod, 1, 256, 256, device)  # CUDA context, allocator and both builders' kernels warm
    document_block_mask(docs[:, :256], 256, _compose(docs[:, :256], None))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    built = block_mask_from_mask_mod(mask_mod, 1, seq_len, seq_len, device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    reference = create_block_mask(mask_mod, 1, None, seq_len, seq_len, device=device, _compile=False)
    assert torch.equal(built.kv_num_blocks, reference.kv_num_blocks)
    assert torch.equal(built.full_kv_num_blocks, reference.full_kv_num_blocks)
    assert torch.equal(built.to_dense(), reference.to_dense())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    from_blocks = document_block_mask(docs, seq_len, mask_mod)  # what FlexBackend builds for packed documents
    torch.cuda.synchronize()
    block_seconds = time.perf_counter() - t0
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(from_blocks, name), getattr(built, name)), name
    record_property("rel_err", f"block mask at {seq_len} positions built in {seconds * 1e3:.1f} ms (evaluated), "
                               f"{block_seconds * 1e3:.1f} ms (from the documents' blocks)")
    assert seconds < 1.0

    # flex through the built mask (forward + backward) against SDPA with the dense mask, on a shorter row
    n = 2048
    short = _compose(docs[:, :n], None)
    mask = FlexBackend().build_mask(docs[:, :n], batch=1, seq_len=n, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 64, device=device, generator=g, requires_grad=True) for _ in range(3))
    out = FlexBackend()(q, k, v, mask)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    idx = torch.arange(n, device=device)
    dense = short(torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device), torch.zeros((), dtype=torch.long,
                  device=device), idx.view(1, 1, n, 1), idx.view(1, 1, 1, n))
    expected = sdpa_attention(q, k, v, dense)
    expected.sum().backward()
    # padding rows attend only to padding: both sides give the same (finite) values there
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
