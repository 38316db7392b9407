"""Activation checkpointing modes: which blocks are wrapped, same outputs and grads, and what backward
recomputes (full: the block's matmuls again; op-level selective: none of them); budget mode: what compiled
graphs save for backward shrinks with the budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.config import ConfigError, config_from_dict
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import canonical_name
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing
from posttrain.parallelisms.compile import apply_compile


def debug_model(n_layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("qwen3", "debug", device="cpu", n_layers=n_layers, attn_backend="sdpa")


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def loss_and_backward_matmuls(
    model: torch.nn.Module, count: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the matmuls backward ran (counting needs a dispatch mode, under which compiled
    code runs eagerly: compiled models pass ``count=False``)."""
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    counter = CountMatmuls()
    if count:
        with counter:
            loss.backward()
    else:
        loss.backward()
    grads = {canonical_name(n): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, counter.count


def wrapped(model: torch.nn.Module) -> list[bool]:
    return [isinstance(b, CheckpointWrapper) for b in model.layers.children()]


@pytest.mark.parametrize(
    "mode, every_n, expected",
    [
        ("none", 2, [False] * 4),
        ("full", 2, [True] * 4),
        ("selective", 2, [False, True, False, True]),
        ("selective", 3, [False, False, True, False]),
        ("selective", 1, [True] * 4),
        ("op", 2, [True] * 4),
        ("budget", 2, [False] * 4),  # the compiled partitioner decides, no wrapper
    ],
)
def test_modes_wrap_the_right_blocks_and_keep_state_dict_keys(mode, every_n, expected):
    model = debug_model()
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, mode, every_n)
    assert wrapped(model) == expected
    assert list(model.state_dict()) == keys


def test_every_mode_gives_the_same_loss_and_grads_and_recomputes_what_it_should():
    ref_loss, ref_grads, base_mms = loss_and_backward_matmuls(debug_model())
    mms = {}
    for mode in ("full", "selective", "op"):
        model = debug_model()
        apply_activation_checkpointing(model, mode, every_n=2)
        loss, grads, mms[mode] = loss_and_backward_matmuls(model)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7)
    recomputed_per_block = (mms["full"] - base_mms) / 4
    assert recomputed_per_block >= 6  # the block's projections run again in backward
    assert mms["selective"] == base_mms + 2 * recomputed_per_block
    assert mms["op"] == base_mms  # matmul outputs are saved, never recomputed


@pytest.mark.parametrize(
    "mode, every_n, skip_last, expected",
    [
        ("full", 2, 1, [True, True, True, False]),
        ("full", 2, 4, [False] * 4),
        ("full", 2, 9, [False] * 4),
        ("selective", 2, 1, [False, True, False, False]),
        ("selective", 1, 2, [True, True, False, False]),
        ("op", 2, 3, [True, False, False, False]),
        ("none", 2, 2, [False] * 4),
    ],
)
def test_skip_last_leaves_the_last_blocks_unwrapped(mode, every_n, skip_last, expected):
    model = debug_model()
    apply_activation_checkpointing(model, mode, every_n, skip_last=skip_last)
    assert wrapped(model) == expected


def test_skip_last_keeps_loss_and_grads_and_recomputes_only_the_wrapped_blocks():
    ref_loss, ref_grads, base_mms = loss_and_backward_matmuls(debug_model())
    full = debug_model()
    apply_activation_checkpointing(full, "full")
    _, _, full_mms = loss_and_backward_matmuls(full)
    model = debug_model()
    apply_activation_checkpointing(model, "full", skip_last=3)
    loss, grads, mms = loss_and_backward_matmuls(model)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7)
    assert mms - base_mms == (full_mms - base_mms) / 4  # one of four blocks recomputed


def test_skip_last_is_checked_in_the_config_and_by_the_function():
    with pytest.raises(ConfigError, match="activation_checkpoint.skip_last"):
        config_from_dict({"activation_checkpoint": {"mode": "full", "skip_last": -1}})
    with pytest.raises(ValueError, match="skip_last"):
        apply_activation_checkpointing(debug_model(), "full", skip_last=-1)


def test_unknown_mode_and_bad_every_n_are_refused():
    with pytest.raises(ValueError, match="activation_checkpoint.mode"):
        apply_activation_checkpointing(debug_model(), "sometimes")
    with pytest.raises(ValueError, match="every_n"):
        apply_activation_checkpointing(debug_model(), "selective", every_n=0)


def test_compile_is_applied_in_place_per_block_with_a_whole_block_checkpoint_outside():
    model = debug_model(n_layers=2)
    apply_activation_checkpointing(model, "full")
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    apply_compile(model)
    for block in model.layers.children():
        assert block._compiled_call_impl is None  # the checkpoint runs eagerly...
        assert block._checkpoint_wrapped_module._compiled_call_impl is not None  # ...around the compiled block
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names


def test_op_mode_compiles_the_wrapper_so_its_save_policy_is_traced():
    model = debug_model(n_layers=2)
    apply_activation_checkpointing(model, "op")
    apply_compile(model)
    for block in model.layers.children():
        assert block._compiled_call_impl is not None
        assert block._checkpoint_wrapped_module._compiled_call_impl is None


def test_compiled_blocks_under_full_checkpointing_equal_eager():
    ref_loss, ref_grads, _ = loss_and_backward_matmuls(debug_model(n_layers=2))
    model = debug_model(n_layers=2)
    apply_activation_checkpointing(model, "full")
    apply_compile(model, device_type="cpu")
    loss, grads, _ = loss_and_backward_matmuls(model, count=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6)


def _pointwise_heavy_block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = F.rms_norm(x, (x.shape[-1],))
    up = h @ w1
    a = F.silu(up) * up.sigmoid()
    return x + (a.cos() * a.sin()) @ w2


def _bytes_saved_for_backward() -> int:
    """Compile with the min-cut partitioner (inductor's, without code generation) and sum what the compiled
    forward saves for backward."""
    torch._dynamo.reset()  # the budget is read when a graph is compiled
    fn = torch.compile(_pointwise_heavy_block, backend="aot_eager_decomp_partition")
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(*shape, generator=gen, requires_grad=True) for shape in ((64, 128), (128, 512), (512, 128)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        out = fn(x, w1, w2)
    out.sum().backward()
    return sum(saved)


@pytest.fixture
def restore_memory_budget():
    yield
    torch._functorch.config.activation_memory_budget = 1.0
    torch._dynamo.reset()


def test_budget_mode_makes_compiled_blocks_save_less(restore_memory_budget):
    apply_activation_checkpointing(debug_model(n_layers=1), "budget", memory_budget=0.1)
    assert torch._functorch.config.activation_memory_budget == 0.1
    low = _bytes_saved_for_backward()
    apply_activation_checkpointing(debug_model(n_layers=1), "none")  # any other mode keeps everything again
    assert torch._functorch.config.activation_memory_budget == 1.0
    full = _bytes_saved_for_backward()
    weights = (128 * 512 + 512 * 128) * 4
    assert low - weights < 0.5 * (full - weights)  # activations saved, weights aside


def test_budget_mode_needs_compile_and_a_share():
    with pytest.raises(ConfigError, match="set compile.enabled = true") as err:
        config_from_dict({"activation_checkpoint": {"mode": "budget"}})
    assert err.value.key == "activation_checkpoint.mode"
    with pytest.raises(ConfigError, match=r"activation_checkpoint.memory_budget must be in \[0, 1\], got 1.5"):
        config_from_dict({"activation_checkpoint": {"mode": "budget", "memory_budget": 1.5}, "compile": {"enabled": True}})
    cfg = config_from_dict({"activation_checkpoint": {"mode": "budget", "memory_budget": 0.3}, "compile": {"enabled": True}})
    assert cfg.activation_checkpoint.memory_budget == 0.3
    with pytest.raises(ValueError, match="memory_budget"):
        apply_activation_checkpointing(debug_model(n_layers=1), "budget", memory_budget=-0.1)


def test_op_mode_with_compile_and_flex_is_refused_in_one_line():
    """Measured wrong on an H200 (benchmarks/results/2026-12-03_h200_diagnose_compile_flex_ac.txt): refused, and
    the same config with full checkpointing gets past this check (to the CPU's own flex refusal)."""
    from posttrain.config import config_from_dict
    from posttrain.parallelisms import ParallelDims
    from posttrain.trainer import build_training_model

    def build(mode: str) -> str:
        cfg = config_from_dict({"model": {"name": "qwen3", "flavor": "debug", "attn_backend": "flex"},
                                "compile": {"enabled": True}, "activation_checkpoint": {"mode": mode}})
        with pytest.raises(SystemExit) as err:
            build_training_model(cfg, parallel_dims=ParallelDims(1, 1, 1, world_size=1), device=torch.device("cpu"),
                                 mixed_precision="no", tokenizer_vocab_size=512)
        return str(err.value)

    assert "activation_checkpoint.mode = 'op'" in build("op")
    assert "no backward on CPU" in build("full")
