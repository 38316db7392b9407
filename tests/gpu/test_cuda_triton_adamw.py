"""posttrain's Triton AdamW against torch's fused AdamW on the device: bf16 and fp32 parameters of a real
model's shapes (odd numbers of rows included), two groups, clipping through grad_scale that changes between
steps, a skipped non-finite step, and the rounding to bf16 (the CPU interpreter truncates, the GPU rounds to
nearest: only here can the two kernels agree to the bit on most elements)."""

from __future__ import annotations

import pytest
import torch

from posttrain.triton_adamw import TritonAdamW, triton_adamw_available

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048,), (128256, 64), (48, 16), (1000, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_adamw_matches_torch_fused_adamw(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda" or not triton_adamw_available(device):
        pytest.skip("the Triton AdamW runs on CUDA")
    g = torch.Generator(device).manual_seed(0)
    start = [torch.randn(s, device=device, generator=g, dtype=torch.float32).mul_(0.02).to(dtype) for s in SHAPES]
    runs = {}
    for name, make in (("triton", TritonAdamW), ("torch", lambda groups, **kw: torch.optim.AdamW(groups, fused=True, **kw))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make([{"params": params[:-2], "weight_decay": 0.1}, {"params": params[-2:], "weight_decay": 0.0}],
                   lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        gen = torch.Generator(device).manual_seed(1)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, device=device, generator=gen).mul_(1e-2 * (1 + step)).to(dtype)
            opt.grad_scale = torch.tensor(1.0 + step, device=device)
            opt.found_inf = torch.tensor(1.0 if step == 3 else 0.0, device=device)  # step 4 is skipped
            opt.step()
        del opt.grad_scale, opt.found_inf
        runs[name] = (params, opt)
    (mine, mine_opt), (ref, ref_opt) = runs["triton"], runs["torch"]
    assert sorted(mine_opt._tables) == [0, 1], "the kernel did not run"
    # The same fp32 math in another order, rounded once: each element within an ulp or two of torch's at its own
    # magnitude, i.e. within a few ulps of the tensor's largest element (elements near zero included).
    tol = 4 * torch.finfo(dtype).eps
    differing, total = 0, 0
    for x, y in zip(mine, ref):
        assert mine_opt.state[x]["step"].item() == ref_opt.state[y]["step"].item() == 5
        for what, got, want in (("param", x, y), ("exp_avg", mine_opt.state[x]["exp_avg"], ref_opt.state[y]["exp_avg"]),
                                ("exp_avg_sq", mine_opt.state[x]["exp_avg_sq"], ref_opt.state[y]["exp_avg_sq"])):
            assert got.dtype == dtype
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err <= tol, (what, tuple(x.shape), err)
        differing += int((x != y).sum())
        total += x.numel()
    if dtype == torch.bfloat16:  # most bf16 elements round to the same value
        assert differing / total < 1e-3, differing / total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_grad_norm_matches_torch_foreach_norm(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda" or not triton_adamw_available(device):
        pytest.skip("the Triton AdamW runs on CUDA")
    from posttrain.parallelisms.grad_clip import get_total_grad_norm

    g = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=g).to(dtype)) for s in SHAPES]
    opt = TritonAdamW([{"params": params[:-2]}, {"params": params[-2:], "weight_decay": 0.0}], lr=1e-3)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g).to(dtype)
    assert opt.grad_norm(params) is None  # no state before the first step
    opt.step()
    for scale in (1e-3, 1.0, 1e3):
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=g).mul_(scale).to(dtype)
        got, want = opt.grad_norm(params), get_total_grad_norm(params)
        assert got is not None and got.device == want.device
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    params[0].grad[3, 5] = float("inf")
    assert torch.isinf(opt.grad_norm(params))
