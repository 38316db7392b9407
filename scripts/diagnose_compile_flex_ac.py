#!/usr/bin/env python
"""Which order of torch.compile and activation checkpointing gives eager's numbers with FlexAttention?

    python scripts/diagnose_compile_flex_ac.py                    # CUDA, qwen3 and qwen3_moe
    python scripts/diagnose_compile_flex_ac.py --device cpu --attention sdpa   # a CPU dry run (no flex backward)

On a random tiny HF model per family (scripts/verify_hf_parity.py's awkward configs) and one packed batch
(two documents in one row), one forward + backward per variant; prints the loss and the largest per-tensor
relative gradient difference against eager sdpa without checkpointing:

    eager_flex_ac_full          eager flex, every block checkpointed
    compile_flex                compiled blocks, flex, no checkpointing
    compile(checkpoint(block))  the order used until 2026-12-03: dynamo traces the checkpoint (a HOP) around flex
    checkpoint(compile(block))  apply_compile's order now for full / selective: the checkpoint runs eagerly
    compile_flex_ac_op          op-level selective checkpointing, compiled wrapper (apply_compile's order)

A variant that raises prints its error instead of numbers. Exit status 0 (it reports, it does not judge).
On an H200 (2026-12-02, torch 2.11) the GPU tier saw compile(checkpoint(block)) + flex wrong (qwen3 loss 7.38
against 7.42); on the CPU (torch 2.13, sdpa) both orders equal eager.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from verify_hf_parity import make_random_hf_model  # noqa: E402

from posttrain.losses import chunked_cross_entropy  # noqa: E402
from posttrain.models import load_hf  # noqa: E402
from posttrain.models.sharded_load import canonical_name  # noqa: E402
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing  # noqa: E402
from posttrain.parallelisms.compile import apply_compile, prime_lazy_attention_kernels  # noqa: E402

DOCUMENTS = (25, 15)


def packed_batch(vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    seq = sum(DOCUMENTS)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in DOCUMENTS]), torch.arange(seq)])
    document_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(DOCUMENTS)]),
                                torch.zeros(seq, dtype=torch.long)])
    labels = ids.roll(-1, dims=1)
    labels[0, DOCUMENTS[0] - 1] = -100
    labels[:, -1] = -100
    batch = {"ids": ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}
    return {k: v.to(device) for k, v in batch.items()}


def one_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    vocab = model.args.vocab_size
    loss_sum, n_tokens = model(
        batch["ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
        output_fn=lambda h, w: chunked_cross_entropy(h, w, batch["labels"], vocab_size=vocab, chunk_size=37),
    )
    loss = loss_sum / n_tokens
    loss.backward()
    grads = {canonical_name(n): p.grad.detach().float().cpu() for n, p in model.named_parameters()
             if p.grad is not None}
    return loss.item(), grads


def compile_wrappers(model: nn.Module, backend: str, device_type: str) -> None:
    """The old order: compile each ``model.layers`` entry as it is (the checkpoint wrapper included)."""
    prime_lazy_attention_kernels(device_type)
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.layers.children():
        block.compile(fullgraph=True, backend=backend)


def build_variants(
    backend: str, device_type: str, attention: str
) -> dict[str, tuple[str, str, Callable[[nn.Module], None] | None]]:
    def product_compile(model: nn.Module) -> None:
        if backend == "inductor":
            apply_compile(model, device_type=device_type)
        else:  # apply_compile's choice of module, another backend (CPU dry runs)
            from posttrain.parallelisms.activation_checkpoint import block_to_compile

            prime_lazy_attention_kernels(device_type)
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
            for block in model.layers.children():
                block_to_compile(block).compile(fullgraph=True, backend=backend)

    return {  # name: (attention backend, activation checkpointing, compile step)
        f"eager_{attention}_ac_full": (attention, "full", None),
        f"compile_{attention}": (attention, "none", product_compile),
        "compile(checkpoint(block))": (attention, "full", lambda m: compile_wrappers(m, backend, device_type)),
        "checkpoint(compile(block))": (attention, "full", product_compile),
        f"compile_{attention}_ac_op": (attention, "op", product_compile),
    }


def max_rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst = (0.0, "")
    for name, want in ref.items():
        if name not in grads:
            return float("inf"), f"{name} has no gradient"
        worst = max(worst, (((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)).item(), name))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", nargs="+", default=["qwen3", "qwen3_moe"])
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--attention", default="flex", choices=["flex", "sdpa"], help="the backend under test")
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = build_variants(args.compile_backend, device.type, args.attention)
    chosen = args.variants or list(variants)
    print(f"torch {torch.__version__}, device {device}, compile backend {args.compile_backend}, "
          f"attention under test {args.attention}")
    print(f"{'family':10} {'variant':28} {'loss':>10} {'loss rel':>9} {'grad rel':>9}  worst tensor / error  (s)")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = make_random_hf_model(family, Path(tmp) / family)
            torch.manual_seed(0)
            ref_model = load_hf(folder, device=device, attn_backend="sdpa")
            batch = packed_batch(ref_model.args.vocab_size, device)
            ref_loss, ref_grads = one_step(ref_model, batch)
            print(f"{family:10} {'eager_sdpa (reference)':28} {ref_loss:10.6f}")
            for name in chosen:
                attn, ac, compile_step = variants[name]
                start = time.perf_counter()
                torch._dynamo.reset()
                try:
                    model = load_hf(folder, device=device, attn_backend=attn)
                    apply_activation_checkpointing(model, ac, every_n=2)
                    if compile_step is not None:
                        compile_step(model)
                    loss, grads = one_step(model, batch)
                except Exception as err:  # noqa: BLE001 - a variant that fails is a result here
                    last = traceback.format_exception_only(type(err), err)[-1].strip().splitlines()[0]
                    print(f"{family:10} {name:28} {'error':>10} {'':9} {'':9}  {last[:160]}"
                          f"  ({time.perf_counter() - start:.0f})")
                    continue
                grad_rel, worst = max_rel(grads, ref_grads)
                print(f"{family:10} {name:28} {loss:10.6f} {abs(loss / ref_loss - 1):9.2e} {grad_rel:9.2e}  {worst}"
                      f"  ({time.perf_counter() - start:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
