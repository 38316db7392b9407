"""Activation checkpointing modes: which blocks are wrapped, same outputs and grads, and what backward
recomputes (full: the block's matmuls again; op-level selective: none of them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

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


def loss_and_backward_matmuls(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    with CountMatmuls() as counter:
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


def test_unknown_mode_and_bad_every_n_are_refused():
    with pytest.raises(ValueError, match="activation_checkpoint.mode"):
        apply_activation_checkpointing(debug_model(), "sometimes")
    with pytest.raises(ValueError, match="every_n"):
        apply_activation_checkpointing(debug_model(), "selective", every_n=0)


def test_compile_is_applied_in_place_per_block():
    model = debug_model(n_layers=2)
    apply_activation_checkpointing(model, "full")
    keys = list(model.state_dict())
    apply_compile(model)
    assert all(b._compiled_call_impl is not None for b in model.layers.children())
    assert list(model.state_dict()) == keys
