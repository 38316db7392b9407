"""The fused cross-entropy's Triton kernel and the in-optimizer gradient clipping on the device: the kernel
against the reference chunk math at a real vocabulary (bf16), the fused loss end to end against naive fp32
logits + cross-entropy (loss, both gradients), and fused AdamW clipping through grad_scale against
clip_grad_norm_ + the same optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import ce_grad_kernel
from posttrain.losses import fused_cross_entropy as fce
from posttrain.losses.ce_grad_kernel import ce_grad_rows_, ce_grad_status
from posttrain.losses.logit_math import ce_grad_
from posttrain.parallelisms import clip_divisor, clip_grad_norm_, get_total_grad_norm


def _needs_triton(device: torch.device) -> None:
    if not ce_grad_status(device).startswith("triton"):
        pytest.skip(f"the Triton kernel does not run here: {ce_grad_status(device)}")


@pytest.mark.parametrize("l2_programs_per_sm", [0, 2])  # one program per row; rows re-read from L2
def test_kernel_matches_reference_math_at_vocab_151936(device: torch.device, l2_programs_per_sm: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_triton(device)
    monkeypatch.setattr(ce_grad_kernel, "L2_PROGRAMS_PER_SM", l2_programs_per_sm)
    g = torch.Generator(device).manual_seed(0)
    x = (torch.randn(300, 151936, device=device, generator=g) * 5).to(torch.bfloat16)
    targets = torch.randint(0, 151936, (300,), device=device, generator=g)
    got, want = x.clone(), x.clone()
    got_rows, want_rows = ce_grad_rows_(got, targets), ce_grad_(want, targets)
    torch.testing.assert_close(got_rows, want_rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2**-8)
    assert ce_grad_status(device) == "triton"


def test_fused_loss_with_the_kernel_matches_naive_fp32(device: torch.device) -> None:
    g = torch.Generator(device).manual_seed(1)
    hidden = (torch.randn(2, 400, 256, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(20_032, 256, device=device, generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 20_000, (2, 400), device=device, generator=g)
    labels[:, :50] = -100
    loss, n = fce.fused_linear_cross_entropy(hidden, weight, labels, vocab_size=20_000, chunk_size=256)
    (loss * 0.5).backward()
    h_ref = hidden.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    ref = F.cross_entropy((h_ref @ w_ref[:20_000].T).flatten(0, 1), labels.flatten(), reduction="sum")
    (ref * 0.5).backward()
    assert int(n) == 2 * 350
    assert loss.item() == pytest.approx(ref.item(), rel=2e-3)
    for got, want in ((hidden.grad, h_ref.grad), (weight.grad, w_ref.grad)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, err
    assert weight.grad[20_000:].abs().max() == 0


def test_clipping_through_fused_adamw_grad_scale(device: torch.device) -> None:
    """Three steps whose gradient norms differ by 100x, so clipping changes Adam's update (on one step alone
    Adam's update does not depend on the gradient's scale)."""
    if device.type != "cuda":
        pytest.skip("fused AdamW's grad_scale path is the CUDA default; the CPU unit test covers the CPU kernel")
    torch.manual_seed(0)
    start = [torch.randn(257, 129, device=device, dtype=torch.bfloat16) * 0.1 for _ in range(3)]
    runs = {}
    for how in ("grad_scale", "clip_grad_norm_", "unclipped"):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=0.1, fused=True)
        g = torch.Generator(device).manual_seed(1)
        for size in (50.0, 0.5, 5.0):
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=g).to(p.dtype) * size / 300
            if how == "grad_scale":
                opt.grad_scale = clip_divisor(get_total_grad_norm(params), 1.0)
            elif how == "clip_grad_norm_":
                clip_grad_norm_(params, 1.0)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
        runs[how] = params
    for a, b, c in zip(runs["grad_scale"], runs["clip_grad_norm_"], runs["unclipped"]):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7)
    assert any((a.float() - c.float()).abs().max() > 4 * 2**-7 for a, c in zip(runs["grad_scale"], runs["unclipped"]))
