"""A few training steps on the tier's device: equal to the same steps on the CPU in fp32 (every family; the CUDA
run uses the fused AdamW), and, on the device, activation checkpointing (each mode), the flex backend and
per-block compile equal to eager sdpa; compile + flex under bf16 autocast (the trainer's GPU default) equal to
eager under the same autocast, loosely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_steps import max_rel_diff, packed_batch, train_steps

from posttrain.models import load_hf
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing
from posttrain.parallelisms.compile import apply_compile

MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "qwen3_moe", "gpt_oss")
LOSS_RTOL = 1e-4  # fp32, 3 AdamW steps: different kernels and reduction orders only
GRAD_RTOL = 1e-3  # first step's gradients, per tensor, relative to its largest entry
VARIANTS = {  # name: (attention backend, activation checkpointing, compile)
    "ac_full": ("sdpa", "full", False),
    "ac_selective": ("sdpa", "selective", False),
    "ac_op": ("sdpa", "op", False),
    "flex": ("flex", "none", False),
    "compile_sdpa": ("sdpa", "none", True),
    "compile_sdpa_ac_full": ("sdpa", "full", True),
    "compile_flex_ac_full": ("flex", "full", True),
}


def _model(folder: Path, device: torch.device, backend: str = "sdpa", ac: str = "none", compiled: bool = False,
           cudagraphs: bool = False):
    model = load_hf(folder, device=device, attn_backend=backend)
    apply_activation_checkpointing(model, ac, every_n=2)
    if compiled:
        # every block of every model compiles nn.Module._call_impl: start from an empty dynamo cache, so that what
        # earlier tests in this worker compiled (other shapes: automatic dynamic graphs, the recompile limit)
        # cannot change what this test runs
        torch._dynamo.reset()
        apply_compile(model, device_type=device.type, cudagraphs=cudagraphs)
    return model


def _skip_flex_backward_on_cpu(device: torch.device, backend: str) -> None:
    if backend == "flex" and device.type == "cpu":
        pytest.skip("FlexAttention has no backward on CPU")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_steps_on_device_equal_cpu_fp32(model_type: str, random_hf: dict[str, Path], device: torch.device,
                                        record_property) -> None:
    batch = packed_batch(1000)
    cpu_losses, cpu_grads = train_steps(_model(random_hf[model_type], torch.device("cpu")), batch)
    losses, grads = train_steps(_model(random_hf[model_type], device), batch.to(device))
    grad_rel, worst = max_rel_diff(grads, cpu_grads)
    record_property("rel_err", f"loss {max(abs(a / b - 1) for a, b in zip(losses, cpu_losses)):.2e}, "
                               f"grad {grad_rel:.2e} ({worst})")
    assert losses == pytest.approx(cpu_losses, rel=LOSS_RTOL)
    assert grad_rel < GRAD_RTOL, worst
    assert cpu_losses[-1] < cpu_losses[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpointing_flex_and_compile_equal_eager(
    model_type: str, variant: str, random_hf: dict[str, Path], device: torch.device, record_property
) -> None:
    backend, ac, compiled = VARIANTS[variant]
    _skip_flex_backward_on_cpu(device, backend)
    batch = packed_batch(1000).to(device)
    ref_losses, ref_grads = train_steps(_model(random_hf[model_type], device), batch)
    losses, grads = train_steps(_model(random_hf[model_type], device, backend, ac, compiled), batch)
    grad_rel, worst = max_rel_diff(grads, ref_grads)
    record_property("rel_err", f"loss {max(abs(a / b - 1) for a, b in zip(losses, ref_losses)):.2e}, "
                               f"grad {grad_rel:.2e} ({worst})")
    assert set(grads) == set(ref_grads)
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert grad_rel < GRAD_RTOL, worst


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compiled_flex_under_bf16_autocast_equals_eager(
    model_type: str, random_hf: dict[str, Path], device: torch.device, record_property
) -> None:
    _skip_flex_backward_on_cpu(device, "flex")
    batch = packed_batch(1000).to(device)
    ref_losses, _ = train_steps(_model(random_hf[model_type], device), batch, autocast_bf16=True)
    losses, _ = train_steps(_model(random_hf[model_type], device, "flex", "none", True), batch, autocast_bf16=True)
    record_property("rel_err", f"loss {max(abs(a / b - 1) for a, b in zip(losses, ref_losses)):.2e}")
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cudagraph_blocks_equal_compiled_blocks(
    model_type: str, random_hf: dict[str, Path], device: torch.device, record_property
) -> None:
    """compile.cudagraphs: training steps and no-grad forwards (each block replays the shared block graph) equal
    the compiled blocks without CUDA graphs."""
    _skip_flex_backward_on_cpu(device, "flex")
    batch = packed_batch(1000).to(device)
    logits, steps = {}, {}
    for graphs in (False, True):  # one after the other: building a compiled model resets dynamo
        model = _model(random_hf[model_type], device, "flex", "none", True, cudagraphs=graphs)
        with torch.no_grad():
            logits[graphs] = [model(b.input_ids, position_ids=b.position_ids, document_ids=b.document_ids)
                              for b in (batch, packed_batch(1000, seed=1).to(device))]
        steps[graphs] = train_steps(model, batch)
    (ref_losses, ref_grads), (losses, grads) = steps[False], steps[True]
    grad_rel, worst = max_rel_diff(grads, ref_grads)
    logits_rel = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(logits[True], logits[False]))
    record_property("rel_err", f"logits {logits_rel:.2e}, loss {max(abs(a / b - 1) for a, b in zip(losses, ref_losses)):.2e}, "
                               f"grad {grad_rel:.2e} ({worst})")
    assert logits_rel < 1e-5
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert grad_rel < GRAD_RTOL, worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sparse_tied_embedding_grad_equals_the_dense_one(device: torch.device, dtype: torch.dtype,
                                                             record_property) -> None:
    """The tied head's gradient with the lookup's rows added on the device: the dense embedding backward's (the same
    per-id fp32 sums rounded once, then one add per id), with half the batch one token (a per-occurrence bf16 add
    would be ~10% off on that row)."""
    from functools import partial

    from posttrain.losses import cross_entropy_for
    from posttrain.models.registry import build_model
    from posttrain.parallelisms.sparse_embedding_grad import use_sparse_embedding_grad

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("llama3", "debug", device, tie_embeddings=True, vocab_size=1000).to(dtype))
    assert use_sparse_embedding_grad(models[1])
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 1000, (4, 2048), generator=g)
        ids[:, ::2] = 7
        ids = ids.to(device)
        labels = torch.roll(ids, -1, dims=1)
        for model in models:
            fn = partial(cross_entropy_for("fused"), labels=labels, vocab_size=1000, chunk_size=0)
            model(ids, output_fn=fn)[0].backward()
    grads = [{n: p.grad.float() for n, p in m.named_parameters()} for m in models]
    rel, worst = max_rel_diff(grads[1], grads[0])
    row = (grads[1]["tok_embeddings.weight"][7] - grads[0]["tok_embeddings.weight"][7]).abs().max()
    row_rel = (row / grads[0]["tok_embeddings.weight"][7].abs().max()).item()
    record_property("rel_err", f"{dtype}: max {rel:.2e} ({worst}); the frequent token's row {row_rel:.2e}")
    assert not models[1].tok_embeddings.weight.grad.is_sparse
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), worst
    assert row_rel < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_own_backward_equals_autograd_in_compiled_blocks(device: torch.device, dtype: torch.dtype,
                                                                  record_property) -> None:
    """`model.rms_norm_backward = "triton"`: the one-pass Triton kernel inside compiled blocks (Qwen3: per-head q/k
    norms of 128 columns too) gives autograd's gradients (fp32 to rounding, bf16 within its noise)."""
    from posttrain.models.common.rms_norm import RMSNorm
    from posttrain.models.registry import build_model

    grads, losses = [], []
    for own in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model("qwen3", "debug", device).to(dtype)
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.own_backward = own
        apply_compile(model, device_type=device.type)
        ids = torch.randint(0, model.args.vocab_size, (2, 256), generator=torch.Generator().manual_seed(2)).to(device)
        loss = model(ids).float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    rel, worst = max_rel_diff(grads[1], grads[0])
    record_property("rel_err", f"{dtype}: loss {abs(losses[1] / losses[0] - 1):.2e}, grad {rel:.2e} ({worst})")
    # the same forward ops; compiled in bf16 they fuse a little differently around the saved rms
    assert losses[1] == pytest.approx(losses[0], rel=1e-6 if dtype == torch.float32 else 1e-3)
    assert rel < (1e-4 if dtype == torch.float32 else 3e-2), worst
