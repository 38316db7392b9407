"""posttrain's Triton AdamW on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before Triton
compiles anything, so each check runs in its own process): the kernel's math against torch's AdamW over several
steps (two groups, weight decay, clipping through grad_scale, a skipped non-finite step), the fallback to torch's
step for what the kernel does not take, checkpoints shared with torch's AdamW, and a Trainer run against the
foreach optimizer. The same kernel against torch's fused one on a GPU: tests/gpu/test_cuda_triton_adamw.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from posttrain.config.sections import OptimizerSection
from posttrain.optim import adamw_kernel, apply_optimizer_config, build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("triton", reason="Triton is not installed: the interpreter checks need it")


def _interpret(code: str, prelude: str = "") -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


_PARAMS = """
import torch
from posttrain.triton_adamw import TritonAdamW

def make(sizes, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, dtype=torch.float32).to(dtype)) for n in sizes]

def groups(params):
    return [{"params": params[:-1], "weight_decay": 0.1}, {"params": params[-1:], "weight_decay": 0.0}]

class Unbuildable:  # a kernel whose launcher cannot be built (no C compiler, a Triton without some feature)
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no C compiler for the launcher")
        return launch

def set_grads(pairs, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for x, y in pairs:
        grad = torch.randn(x.shape, generator=g) * scale
        x.grad, y.grad = grad.to(x.dtype, copy=True), grad.to(y.dtype, copy=True)
"""


def test_kernel_matches_torch_adamw_with_clipping_and_a_skipped_step() -> None:
    out = _interpret(prelude=_PARAMS, code="""
    a, b = make((5008, 4096, 32, 9008)), make((5008, 4096, 32, 9008))
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    mine, ref = TritonAdamW(groups(a), **kw), torch.optim.AdamW(groups(b), foreach=False, **kw)
    for step in range(4):
        set_grads(zip(a, b), step, scale=10.0 if step % 2 else 0.1)
        divisor = torch.tensor(3.0 if step % 2 else 1.0)
        mine.grad_scale = divisor
        for y in b:
            y.grad /= divisor
        mine.step(); ref.step()
    assert sorted(mine._tables) == [0, 1], "the kernel did not run"
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(mine.state[x][key], ref.state[y][key].to(mine.state[x][key]), rtol=1e-5, atol=1e-7)
    assert all(mine.state[x]["step"].item() == 4 for x in a)
    # a non-finite step (found_inf = 1, as the Trainer's divergence guard sets it): nothing moves, no step counted
    before = [(x.clone(), mine.state[x]["exp_avg"].clone()) for x in a]
    set_grads(zip(a, b), 9)
    mine.found_inf = torch.tensor(1.0)
    mine.step()
    assert all(torch.equal(x, p) and torch.equal(mine.state[x]["exp_avg"], m) for x, (p, m) in zip(a, before))
    assert all(mine.state[x]["step"].item() == 4 for x in a)
    mine.found_inf = torch.tensor(0.0)
    mine.step()
    assert all(not torch.equal(x, p) for x, (p, _) in zip(a, before)) and mine.state[a[0]]["step"].item() == 5
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_grad_norm_from_the_tables_matches_torch_and_declines_what_it_cannot_see() -> None:
    out = _interpret(prelude=_PARAMS, code="""
    import math
    from posttrain.parallelisms.grad_clip import get_total_grad_norm
    for dtype in (torch.float32, torch.bfloat16):
        a = make((5008, 4096, 32, 9008), dtype)
        opt = TritonAdamW(groups(a), lr=1e-2)
        set_grads(zip(a, a), 0)
        assert opt.grad_norm(a) is None, "no state yet (the first step): the caller's norm"
        opt.step()
        set_grads(zip(a, a), 1, scale=3.0)
        want = get_total_grad_norm(a)
        got = opt.grad_norm(a)
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        assert opt.grad_norm(a[:-1]) is None, "not exactly the optimizer's parameters with gradients"
        stranger = torch.nn.Parameter(torch.ones(16, dtype=dtype))
        stranger.grad = torch.ones_like(stranger)
        assert opt.grad_norm([*a, stranger]) is None
        a[1].grad = None  # a parameter without a gradient this step: left out on both sides
        torch.testing.assert_close(opt.grad_norm(a), get_total_grad_norm(a), rtol=1e-5, atol=0)
        a[0].grad[7] = float("inf")
        assert math.isinf(opt.grad_norm(a).item())
        a[0].grad[8] = float("nan")
        assert math.isnan(opt.grad_norm(a).item())
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_bf16_parameters_and_states_stay_bf16_within_an_ulp_of_torch_fused_adamw() -> None:
    """bf16 parameters and states: fp32 math, one rounding to bf16 per step. Triton's interpreter truncates where
    the GPU rounds to nearest (so one step, one ulp); the GPU test checks the rounding itself."""
    out = _interpret(prelude=_PARAMS, code="""
    a, b = make((4096, 2048, 64), torch.bfloat16), make((4096, 2048, 64), torch.bfloat16)
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    mine, ref = TritonAdamW(groups(a), **kw), torch.optim.AdamW(groups(b), fused=True, **kw)
    set_grads(zip(a, b), 0)
    mine.step(); ref.step()
    assert sorted(mine._tables) == [0, 1], "the kernel did not run"
    one_ulp = 2 * torch.finfo(torch.bfloat16).eps
    for x, y in zip(a, b):
        for got, want in ((x, y), (mine.state[x]["exp_avg"], ref.state[y]["exp_avg"]),
                          (mine.state[x]["exp_avg_sq"], ref.state[y]["exp_avg_sq"])):
            assert got.dtype == torch.bfloat16
            assert ((got.float() - want.float()).abs() <= one_ulp * want.float().abs()).all()
    assert any(not torch.equal(x, make((4096, 2048, 64), torch.bfloat16)[i]) for i, x in enumerate(a))
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_what_the_kernel_does_not_take_goes_to_torch_and_checkpoints_are_torchs() -> None:
    out = _interpret(prelude=_PARAMS, code="""
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    # a numel that is not a multiple of 16: the whole step is torch's (fused) one, with the same result
    a, b = make((4096, 17)), make((4096, 17))
    mine, ref = TritonAdamW(groups(a), **kw), torch.optim.AdamW(groups(b), fused=True, **kw)
    for step in range(3):
        set_grads(zip(a, b), step)
        mine.step(); ref.step()
    assert not mine._tables
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a group mixing bf16 and fp32 parameters, and amsgrad (a state key this class does not make): torch's step
    a = make((4096,)) + make((64,), torch.bfloat16)
    b = make((4096,)) + make((64,), torch.bfloat16)
    mine, ref = TritonAdamW([{"params": a}], **kw), torch.optim.AdamW([{"params": b}], fused=True, **kw)
    set_grads(zip(a, b), 0)
    mine.step(); ref.step()
    assert not mine._tables and all(torch.equal(x, y) for x, y in zip(a, b))
    a, b = make((4096, 64)), make((4096, 64))
    mine, ref = TritonAdamW(groups(a), amsgrad=True, **kw), torch.optim.AdamW(groups(b), fused=True, amsgrad=True, **kw)
    for step in range(2):
        set_grads(zip(a, b), step)
        mine.step(); ref.step()
    assert not mine._tables and all(torch.equal(x, y) for x, y in zip(a, b))
    # beta1 = 0 (the kernel takes log2 of each beta): torch's step too
    a, b = make((4096, 64)), make((4096, 64))
    kw0 = dict(kw, betas=(0.0, 0.95))
    mine, ref = TritonAdamW(groups(a), **kw0), torch.optim.AdamW(groups(b), fused=True, **kw0)
    set_grads(zip(a, b), 0)
    mine.step(); ref.step()
    assert not mine._tables and all(torch.equal(x, y) for x, y in zip(a, b))
    # a checkpoint written by the Triton AdamW resumes in torch's foreach AdamW and the other way round
    a, b, c = make((4096, 64)), make((4096, 64)), make((4096, 64))
    mine = TritonAdamW(groups(a), **kw)
    torch_opt = torch.optim.AdamW(groups(b), foreach=True, **kw)
    for step in range(2):
        set_grads(zip(a, b), step)
        mine.step(); torch_opt.step()
    resumed_torch = torch.optim.AdamW(groups(c), foreach=True, **kw)
    with torch.no_grad():
        for x, z in zip(a, c):
            z.copy_(x)
    resumed_torch.load_state_dict(mine.state_dict())
    resumed_mine = TritonAdamW(groups(b), **kw)
    resumed_mine.load_state_dict(torch_opt.state_dict())
    for step in range(2, 4):
        set_grads(zip(c, b), step)
        resumed_torch.step(); resumed_mine.step()
    assert sorted(resumed_mine._tables) == [0, 1]
    for z, y in zip(c, b):
        torch.testing.assert_close(z, y, rtol=1e-5, atol=1e-6)
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_a_kernel_that_fails_to_build_hands_over_to_torch_once_with_a_warning() -> None:
    out = _interpret(prelude=_PARAMS, code="""
    import logging
    import posttrain.triton_adamw as module
    module._adamw_blocks = Unbuildable()
    warnings = []
    logging.getLogger("posttrain").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    a, b = make((4096, 64)), make((4096, 64))
    mine, ref = TritonAdamW(groups(a), **kw), torch.optim.AdamW(groups(b), fused=True, **kw)
    for step in range(3):
        set_grads(zip(a, b), step)
        mine.grad_scale = ref.grad_scale = torch.tensor(2.0)
        mine.step(); ref.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(mine.state[x]["step"].item() == 3 for x in a)  # the failed launch's step count was taken back
    assert len(warnings) == 1 and "no C compiler" in warnings[0] and "torch's fused AdamW" in warnings[0], warnings
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_a_norm_kernel_that_fails_to_build_leaves_the_step_kernel_running() -> None:
    out = _interpret(prelude=_PARAMS, code="""
    import posttrain.triton_adamw as module
    module._grad_squares_blocks = Unbuildable()
    a = make((4096, 64))
    opt = TritonAdamW(groups(a), lr=1e-2)
    set_grads(zip(a, a), 0)
    opt.step()
    set_grads(zip(a, a), 1)
    assert opt.grad_norm(a) is None and opt._norm_failed and opt._kernel_failed is None
    opt.step()
    assert opt._kernel_ran and opt._kernel_failed is None
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_trainer_steps_with_the_triton_adamw_match_foreach(tmp_path: Path) -> None:
    """Through the Trainer (clipping inside the kernel via grad_scale, the divergence guard's found_inf on two
    NaN steps): the same parameters as torch's foreach AdamW after clip_grad_norm_ with the host-checked guard."""
    out = _interpret(f"""
    import sys, torch
    sys.path.insert(0, "tests/unit")
    from pathlib import Path
    from test_step_without_host_sync import _run
    from posttrain.triton_adamw import TritonAdamW
    import posttrain.trainer as trainer_module
    logs = [False, False, False, False, True]
    extra = ("--training.max_grad_norm", "0.01")
    _, ref, ref_metrics = _run(Path({str(tmp_path)!r}) / "foreach", "false", logs, extra=extra)
    built = []
    real_build = trainer_module.build_optimizer
    trainer_module.build_optimizer = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    guard, got, metrics = _run(Path({str(tmp_path)!r}) / "triton", "triton", logs, extra=extra)
    assert type(built[0]) is TritonAdamW and sorted(built[0]._tables) == [0, 1], built
    assert metrics[-1]["skipped_steps"] == 2 and ref_metrics[-1]["skipped_steps"] == 2
    for name, p in got.items():
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)
    print("ok")
    """)
    assert out.strip().endswith("ok")


def test_adamw_kernel_choice_and_refusal() -> None:
    cpu = torch.device("cpu")
    model = torch.nn.Linear(16, 16)
    assert adamw_kernel("auto", cpu, list(model.parameters())) == "foreach"
    assert adamw_kernel("true", cpu, []) == "torch_fused" and adamw_kernel("false", cpu, []) == "foreach"
    assert adamw_kernel("auto", torch.device("cuda"), list(model.parameters())) in ("triton", "torch_fused")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match='optimizer.fused = "triton" needs a CUDA device'):
            build_optimizer(model, OptimizerSection(fused="triton"), cpu)
    assert type(build_optimizer(model, OptimizerSection(fused="auto"), cpu)) is torch.optim.AdamW


def test_train_py_refuses_the_triton_kernel_on_a_cpu_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "train.py", "--config", "train_configs/debug_sft.toml", "--optimizer.fused",
                           "triton", "--training.steps", "1", "--job.output_dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert 'optimizer.fused = "triton" needs a CUDA device' in proc.stderr and "Traceback" not in proc.stderr


def test_a_resumed_optimizer_keeps_its_own_kernel() -> None:
    """A checkpoint saved by the foreach AdamW (CPU, or optimizer.fused = false) resumed where the fused kernel runs:
    load_state_dict copies the saved groups' fused / foreach flags; apply_optimizer_config puts this run's back (else
    torch's step refuses the Trainer's grad_scale)."""
    model = torch.nn.Linear(16, 16)
    saved = build_optimizer(model, OptimizerSection(fused="false"), torch.device("cpu"))
    model(torch.randn(4, 16)).sum().backward()
    saved.step()
    resumed = build_optimizer(model, OptimizerSection(fused="true"), torch.device("cpu"))
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["fused"] is False  # what the saved groups said
    cfg = OptimizerSection(fused="true")
    apply_optimizer_config(resumed, build_lr_scheduler(resumed, _Schedule(), 10), cfg)
    assert all(g["fused"] is True and not g["foreach"] for g in resumed.param_groups)
    resumed.grad_scale = torch.tensor(2.0)
    resumed.step()  # torch's fused step with grad_scale: refused when the flags say foreach


class _Schedule:
    warmup_steps, decay, min_lr_ratio = 0, "constant", 0.0
