"""Attention of a few new tokens per row against a KV cache (decoding), and the choice of its kernel.

A decode step has 1 query per row (``n_rep`` per KV head after folding the grouped heads) against hundreds or
thousands of cached keys, under a dense boolean mask (per-row positions). SDPA's kernels that take such a mask
(memory-efficient, on CUDA) tile the queries by 32 or 64 rows, so with 1-2 real rows per tile most of their
tensor-core work is padding. ``matmul_decode_attention`` writes the same attention as two batched matrix
products, which read each cached key and value once and do no padded work: scores ``q @ k^T`` in fp32
(``bmm`` with an fp32 output on CUDA; the inputs upcast elsewhere), the mask and the softmax in fp32, then
``probs.to(v.dtype) @ v`` (what flash kernels do with P too). Its extra memory is the fp32 scores
``[B, Hq, S, T]``, so it is used only for a few queries per row (``MATMUL_MAX_QUERIES``).

Which one runs is ``decode_attention_kind()``: "auto" (matmul on CUDA, SDPA elsewhere: on the CPU SDPA's
kernel is already a plain loop over the keys), "matmul" or "sdpa"; ``use_decode_attention(kind)`` sets it
for a block of code (the native engine sets it around its decode steps and graph captures).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

DECODE_ATTENTION_KINDS = ("auto", "matmul", "sdpa")
MATMUL_MAX_QUERIES = 4  # query positions per row up to which "auto" / "matmul" use the batched matmuls
_kind = "auto"
_HAS_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(..., out_dtype=) on CUDA (torch >= 2.8)


def check_decode_attention_kind(kind: str) -> str:
    if kind not in DECODE_ATTENTION_KINDS:
        raise ValueError(f"unknown decode_attention {kind!r}; choose one of {list(DECODE_ATTENTION_KINDS)}")
    return kind


@contextmanager
def use_decode_attention(kind: str) -> Iterator[None]:
    """Decode attention of kind ``kind`` inside the block (the previous kind after it)."""
    global _kind
    previous, _kind = _kind, check_decode_attention_kind(kind)
    try:
        yield
    finally:
        _kind = previous


def decode_attention_kind() -> str:
    return _kind


def uses_matmul(q: torch.Tensor) -> bool:
    """Whether the decode attention of queries ``q`` [B, Hq, S, D] goes through ``matmul_decode_attention``."""
    if q.shape[2] > MATMUL_MAX_QUERIES or _kind == "sdpa":
        return False
    return _kind == "matmul" or q.device.type == "cuda"


def matmul_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            scale: float | None) -> torch.Tensor:
    """q [B, Hq, S, D]; k, v [B, Hkv, T, D] (views of a cache are fine); mask [B, 1, S, T] bool (True: attend).
    Returns [B, Hq, S, D] in q's dtype. Query head h uses KV head ``h // (Hq // Hkv)``, as in SDPA's GQA."""
    bsz, n_heads, seq_len, head_dim = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv
    scale = head_dim**-0.5 if scale is None else scale
    # fold each KV head's query heads into the rows: [B * Hkv, n_rep * S, D], row r * S + s
    q_rows = q.reshape(bsz * n_kv, n_rep * seq_len, head_dim)
    keys = k.reshape(bsz * n_kv, length, head_dim)
    values = v.reshape(bsz * n_kv, length, head_dim)
    scores = _scores_fp32(q_rows, keys.transpose(1, 2)).view(bsz, n_kv, n_rep, seq_len, length)
    scores.mul_(scale).masked_fill_(~mask.unsqueeze(2), float("-inf"))  # [B, 1, 1, S, T] over the heads
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(bsz * n_kv, n_rep * seq_len, length)
    out = torch.bmm(probs, values)
    return out.view(bsz, n_heads, seq_len, head_dim).to(q.dtype)


def _scores_fp32(q_rows: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    if q_rows.device.type == "cuda" and q_rows.dtype in (torch.float16, torch.bfloat16):
        if _HAS_BMM_OUT_DTYPE:
            return torch.bmm(q_rows, keys_t, out_dtype=torch.float32)  # fp32 accumulate and output, no copies
        return torch.bmm(q_rows, keys_t).float()  # scores rounded to 16 bits, as HF's eager attention
    return torch.bmm(q_rows.float(), keys_t.float())



def sdpa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float | None) -> torch.Tensor:
    """The same through SDPA without k/v copies: q [B, Hq, S, D] -> [B, Hkv, n_rep * S, D], the mask
    [B, 1, S, T] repeated per folded row."""
    bsz, n_heads, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    n_rep = n_heads // n_kv
    q = q.reshape(bsz, n_kv, n_rep * seq_len, head_dim)
    if mask.shape[-2] != 1:
        mask = mask.expand(bsz, 1, seq_len, mask.shape[-1]).repeat(1, 1, n_rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(bsz, n_heads, seq_len, head_dim)
