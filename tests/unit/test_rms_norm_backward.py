"""RMSNorm with its own backward (`model.rms_norm_backward = "triton"`): the same forward, bit for bit; the
gradients of autograd's backward (fp32 to rounding, bf16 within an ulp), in eager, under torch.compile and through
the Trainer; the Triton kernel against the same math in torch ops through Triton's interpreter (TRITON_INTERPRET=1,
in a subprocess). On the GPU: tests/gpu/test_cuda_training_steps.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.registry import build_model
from posttrain.parallelisms.compile import apply_compile
from posttrain.trainer import Trainer
from sft_data_fakes import random_token_batches

REPO = Path(__file__).resolve().parents[2]


def _pair(dim: int, zero_centered: bool, dtype: torch.dtype) -> tuple[RMSNorm, RMSNorm]:
    norms = (RMSNorm(dim, zero_centered=zero_centered), RMSNorm(dim, zero_centered=zero_centered))
    with torch.no_grad():
        norms[0].weight.normal_(generator=torch.Generator().manual_seed(0))
        norms[1].weight.copy_(norms[0].weight)
    norms[1].own_backward = True
    return tuple(n.to(dtype) for n in norms)


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_backward_equals_autograds(zero_centered: bool, dtype: torch.dtype) -> None:
    ref, own = _pair(96, zero_centered, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 96, generator=g).to(dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [ref(xs[0]), own(xs[1])]
    assert torch.equal(outs[0], outs[1])  # the forward is the same ops
    dy = torch.randn(outs[0].shape, generator=g).to(outs[0].dtype)
    for out in outs:
        out.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(own.weight.grad, ref.weight.grad, **tol)
    assert xs[1].grad.dtype == dtype and own.weight.grad.dtype == dtype


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_residual_carries_the_residuals_gradient_into_the_op(zero_centered: bool, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``normed, x = norm.with_residual(x); h = x + f(normed)``: the gradients of ``h = x + f(norm(x))``, the
    residual's share added inside the op (one call, given the residual's gradient), not by autograd."""
    import posttrain.models.common.rms_norm_backward as own_backward

    residual_grads = []
    reference = own_backward.rms_norm_backward_reference
    monkeypatch.setattr(own_backward, "rms_norm_backward_reference",
                        lambda *a: residual_grads.append(a[5]) or reference(*a))
    ref, own = _pair(64, zero_centered, dtype)
    f = torch.nn.Linear(64, 64).to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    normed, residual = own.with_residual(xs[1])
    assert residual.data_ptr() == xs[1].data_ptr()  # the same values, no copy
    outs = [xs[0] + f(ref(xs[0])), residual + f(normed)]
    assert torch.equal(outs[0], outs[1])
    dh = torch.randn(outs[0].shape, generator=g).to(dtype)
    for out in outs:
        out.backward(dh)
    assert len(residual_grads) == 1 and torch.equal(residual_grads[0], dh)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(own.weight.grad, ref.weight.grad, **tol)
    # without own_backward it is (norm(x), x) itself
    ref_normed, ref_residual = ref.with_residual(xs[0])
    assert ref_residual is xs[0] and torch.equal(ref_normed, ref(xs[0]))


def test_compiled_blocks_with_own_backward_equal_autograds(monkeypatch: pytest.MonkeyPatch) -> None:
    import posttrain.models.common.rms_norm_backward as own_backward

    calls = []
    with_residual = []
    reference = own_backward.rms_norm_backward_reference

    def counted(*a):
        calls.append(1)
        with_residual.append(a[5] is not None)
        return reference(*a)

    monkeypatch.setattr(own_backward, "rms_norm_backward_reference", counted)
    grads = []
    for own in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model("qwen3", "debug", "cpu")  # per-head q/k norms too
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        assert len(norms) > 4
        for m in norms:
            m.own_backward = own
        apply_compile(model, device_type="cpu")
        ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        model(ids).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == len(norms), "every norm's backward ran through the op (compiled as an opaque call)"
    # both block norms of each layer add the residual stream's gradient in the op; q / k and the final norm do not
    assert sum(with_residual) == 2 * model.args.n_layers
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_steps_with_own_backward_equal_autograds(tmp_path: Path) -> None:
    losses = {}
    for mode in ("autograd", "triton"):
        cfg = load_config(["--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path / mode),
                           "--metrics.tensorboard", "false", "--training.batch_size", "2", "--training.seq_len", "16",
                           "--model.rms_norm_backward", mode])
        trainer = Trainer(cfg)
        try:
            norms = {n: m for n, m in trainer.model.named_modules() if isinstance(m, RMSNorm)}
            head_norms = [n for n in norms if n.endswith(("q_norm", "k_norm"))]
            assert head_norms and len(norms) > len(head_norms)  # qwen3: both kinds
            for n, m in norms.items():  # the per-head q / k norms keep autograd's
                assert m.own_backward == (mode == "triton" and n not in head_norms), n
            trainer.data_loader = random_token_batches(3)
            from posttrain.recipes.sft import build_loss_fn

            losses[mode] = [trainer.train_step(build_loss_fn(cfg))["loss"] for _ in range(3)]
        finally:
            trainer.close()
    assert losses["triton"] == pytest.approx(losses["autograd"], rel=1e-5)
    assert losses["triton"][-1] < losses["triton"][0]


def test_a_kernel_that_fails_to_build_hands_over_to_the_torch_ops_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import posttrain.models.common.rms_norm_backward as own_backward

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no C compiler for the launcher")
            return launch

    monkeypatch.setattr(own_backward, "_rms_norm_backward_rows", Unbuildable(), raising=False)
    monkeypatch.setattr(own_backward, "_kernel_takes", lambda dy, x, residual_grad=None: True)  # as on a GPU
    monkeypatch.setattr(own_backward, "_kernel_failed", None)
    monkeypatch.setattr(own_backward, "_kernel_ran", False)
    warnings = []
    monkeypatch.setattr(own_backward.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    ref, own = _pair(32, False, torch.float32)
    x = torch.randn(4, 32)
    for _ in range(2):
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ref(xs[0]).sum().backward()
        own(xs[1]).sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    assert len(warnings) == 1 and "no C compiler" in warnings[0]


def test_the_op_on_a_permuted_input_under_compile_and_opcheck() -> None:
    """The op's fake (compile-time) outputs are contiguous like its real ones: a permuted input compiles."""
    from posttrain.models.common.rms_norm_backward import rms_norm_backward

    x = torch.randn(2, 4, 3, 16).transpose(1, 2)  # not contiguous
    dy = torch.randn(2, 3, 4, 16)
    w = torch.randn(16)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.library.opcheck(rms_norm_backward, (dy, x, w, rstd, False))
    torch.library.opcheck(rms_norm_backward, (dy, x, w, rstd, False, torch.randn(2, 3, 4, 16)))
    ref, own = _pair(16, False, torch.float32)
    own_compiled = torch.compile(lambda t: own(t.transpose(1, 2)), backend="aot_eager")
    xs = [torch.randn(2, 4, 3, 16, requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        xs[1].copy_(xs[0])
    ref(xs[0].transpose(1, 2)).square().sum().backward()
    own_compiled(xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)


def test_kernel_equals_the_torch_math_through_the_interpreter() -> None:
    pytest.importorskip("triton", reason="Triton is not installed: the interpreter check needs it")
    code = textwrap.dedent("""
    import torch
    from posttrain.models.common.rms_norm_backward import rms_norm_backward, rms_norm_backward_reference, _kernel_takes
    for zero_centered in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            # rows not a multiple of the programs or of the rows a trip (300 x 128: 32 a trip); 96 columns
            for shape, with_residual in (((37, 96), False), ((2, 5, 128), True), ((300, 128), False),
                                         ((300, 128), True), ((3, 2048), True)):
                g = torch.Generator().manual_seed(0)
                x, dy, r = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
                r = r if with_residual else None
                w = torch.randn(shape[-1], generator=g).to(dtype)
                rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
                assert _kernel_takes(dy, x, r)
                dx, dw = rms_norm_backward(dy, x, w, rstd, zero_centered, r)
                rx, rw = rms_norm_backward_reference(dy, x, w, rstd, zero_centered, r)
                if with_residual:  # the residual is in the kernel's dx, not added after
                    bare = rms_norm_backward_reference(dy, x, w, rstd, zero_centered)[0]
                    assert (rx.float() - bare.float()).abs().max() > 0.1
                assert dx.dtype == dtype and dw.dtype == dtype and dx.shape == x.shape
                # fp32: summation order; bf16: the interpreter truncates where the GPU rounds (an ulp)
                tol = 1e-5 if dtype == torch.float32 else 2 ** -6
                for got, want in ((dx, rx), (dw, rw)):
                    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    assert err <= tol, (zero_centered, dtype, shape, with_residual, err)
    print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
