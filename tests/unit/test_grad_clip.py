"""clip_grad_norm_ on plain tensors agrees with torch's; DTensor meshes are covered in
tests/integration/test_fsdp_tp.py."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.parallelisms.grad_clip import clip_grad_norm_


def params_with_grads(scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = []
    for shape, dtype in (((3, 4), torch.float32), ((5,), torch.float32), ((2, 2), torch.bfloat16)):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * scale).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: ignored
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_matches_torch_clip_grad_norm(norm_type):
    mine, ref = params_with_grads(), params_with_grads()
    norm = clip_grad_norm_(mine, 0.5, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm, ref_norm.float(), rtol=1e-3, atol=1e-5)
    for a, b in zip(mine, ref):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-3)


def test_small_gradients_are_left_alone_and_zero_max_norm_only_measures():
    params = params_with_grads(scale=1e-3)
    before = [p.grad.clone() for p in params if p.grad is not None]
    clip_grad_norm_(params, 10.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in params if p.grad is not None]))
    big = params_with_grads(scale=100.0)
    norm = clip_grad_norm_(big, 0.0)
    assert norm > 10 and big[0].grad.abs().max() > 10


def test_non_finite_norm_raises_when_asked():
    params = params_with_grads()
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert torch.isnan(clip_grad_norm_(params_with_grads() + params[:1], 1.0))


def test_no_gradients_gives_zero():
    assert clip_grad_norm_([torch.nn.Parameter(torch.zeros(3))], 1.0).item() == 0.0


def test_bf16_and_fp32_gradients_are_each_clipped_in_their_own_dtype():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(40, 30, dtype=dt)) for dt in (torch.bfloat16, torch.float32, torch.bfloat16)]
    for p in params:
        p.grad = (torch.randn(p.shape) * 5).to(p.dtype)
    before = clip_grad_norm_(params, 1.0)
    assert before.dtype == torch.float32 and before.item() > 100
    after = math.sqrt(sum(p.grad.float().pow(2).sum().item() for p in params))
    assert after == pytest.approx(1.0, rel=1e-2)  # bf16: the coefficient rounds to 8 bits
    assert [p.grad.dtype for p in params] == [torch.bfloat16, torch.float32, torch.bfloat16]
