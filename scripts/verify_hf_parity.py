#!/usr/bin/env python
"""Compare posttrain's logits with transformers' on the same HF checkpoint.

    python scripts/verify_hf_parity.py --hf-dir /path/to/Qwen3-0.6B --dtype bfloat16 --device cuda
    python scripts/verify_hf_parity.py --model-type llama --random     # a random tiny model, built first

Two checks: a batch of random ids (positions 0..S-1), and one packed row of three documents with restarting
position ids and document ids (posttrain) against each document run alone (transformers). Prints the max and
mean absolute logit difference and exits 1 when a max exceeds --tol + --rtol * max|logit|. fp32 is the real
parity check (expect ~1e-6 relative); bf16/fp16 only bound rounding noise, which grows with the logits.

Random tiny configs use awkward shapes on purpose (head_dim != hidden / heads, GQA, untied embeddings, a
vocabulary that is not a multiple of 64, llama3 RoPE scaling); add a family by adding a builder to
RANDOM_CONFIG_BUILDERS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# (absolute, relative to the largest |logit|) tolerance on the max abs difference, per dtype
DEFAULT_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.0, 5e-2), torch.float16: (0.0, 1e-2)}


def random_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000,  # not a multiple of 64
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=32,  # != 96 / 4
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={  # original context shorter than the test sequences, so the scaling matters
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_qwen3_config() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != 64 / 4
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
    )


RANDOM_CONFIG_BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": random_llama_config,
    "qwen3": random_qwen3_config,
}


@torch.no_grad()
def make_random_hf_model(model_type: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny transformers model of ``model_type`` to ``out_dir``.

    Every parameter is randomised (norm weights around 1, biases non-zero), so a swapped or missing tensor
    shows up in the logits.
    """
    from transformers import AutoModelForCausalLM

    if model_type not in RANDOM_CONFIG_BUILDERS:
        raise SystemExit(f"no random config for {model_type!r}; choose one of {sorted(RANDOM_CONFIG_BUILDERS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(RANDOM_CONFIG_BUILDERS[model_type]())
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
        elif "embed_tokens" in name:
            param.normal_(0.0, 1.0)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


@dataclass
class ParityReport:
    max_abs: float
    mean_abs: float
    packed_max_abs: float
    packed_mean_abs: float
    ref_max_abs: float  # largest |logit| of the reference, for a relative error

    @property
    def rel(self) -> float:
        return max(self.max_abs, self.packed_max_abs) / max(self.ref_max_abs, 1e-12)


def _split_lengths(seq_len: int) -> list[int]:
    first, second = seq_len // 2, seq_len // 3
    return [first, second, seq_len - first - second]


@torch.no_grad()
def compare_logits(
    hf_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seq_len: int = 64,
    batch: int = 2,
    seed: int = 0,
    attn_backend: str = "sdpa",
) -> ParityReport:
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_hf

    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    ours = load_hf(hf_dir, dtype=dtype, device=device, attn_backend=attn_backend).eval()
    vocab = ref.config.vocab_size
    if ours.args.vocab_size != vocab:
        raise AssertionError(f"vocab size differs: transformers {vocab}, posttrain {ours.args.vocab_size}")

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    ref_logits = ref(input_ids=ids, use_cache=False).logits.float()
    our_logits = ours(ids).float()
    diff = (ref_logits - our_logits).abs()

    lengths = _split_lengths(seq_len)
    packed = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0).to(device)
    ref_packed = torch.cat(
        [ref(input_ids=doc, use_cache=False).logits.float() for doc in packed.split(lengths, dim=1)], dim=1
    )
    our_packed = ours(packed, position_ids=position_ids, document_ids=document_ids).float()
    packed_diff = (ref_packed - our_packed).abs()

    return ParityReport(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        packed_max_abs=packed_diff.max().item(),
        packed_mean_abs=packed_diff.mean().item(),
        ref_max_abs=max(ref_logits.abs().max().item(), ref_packed.abs().max().item()),
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF checkpoint folder (or Hub id)")
    source.add_argument("--model-type", choices=sorted(RANDOM_CONFIG_BUILDERS), help="with --random")
    parser.add_argument("--random", action="store_true", help="build a random tiny model of --model-type first")
    parser.add_argument("--out-dir", help="where --random saves its model (default: a temporary folder)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flex"])
    parser.add_argument("--tol", type=float, default=None, help="absolute part of the allowed max abs diff")
    parser.add_argument("--rtol", type=float, default=None, help="part of the allowed max abs diff per max |logit|")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model_type and not args.random:
        parser.error("--model-type needs --random (or use --hf-dir)")
    if args.seq_len < 3:
        parser.error("--seq-len must be at least 3 (the packed check uses three documents)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    dtype = getattr(torch, args.dtype)
    default_tol, default_rtol = DEFAULT_TOLERANCE[dtype]
    tol = args.tol if args.tol is not None else default_tol
    rtol = args.rtol if args.rtol is not None else default_rtol
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf_dir
        if args.random:
            hf_dir = make_random_hf_model(args.model_type, args.out_dir or tmp, seed=args.seed)
        report = compare_logits(
            hf_dir, dtype=dtype, device=args.device, seq_len=args.seq_len, batch=args.batch, seed=args.seed,
            attn_backend=args.attn_backend,
        )
    print(f"logits      max abs diff {report.max_abs:.3e}  mean abs diff {report.mean_abs:.3e}")
    print(f"packed row  max abs diff {report.packed_max_abs:.3e}  mean abs diff {report.packed_mean_abs:.3e}")
    allowed = tol + rtol * report.ref_max_abs
    print(f"max |logit| {report.ref_max_abs:.3e}; relative (max diff / max |logit|) {report.rel:.3e}")
    print(f"allowed max abs diff {allowed:.3e} (tol {tol:.1e} + rtol {rtol:.1e} * max |logit|)")
    if max(report.max_abs, report.packed_max_abs) > allowed:
        print("FAIL: above tolerance")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
