"""Attention's q/k/v as one matmul while training plain linears (`Attention.project_qkv`): the same loss and
gradients as three matmuls, one matmul counted where it applies, three where it does not (no gradients, LoRA,
frozen weights), and under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models.common.attention import Attention
from posttrain.models.common.lora import apply_lora
from posttrain.models.registry import build_model
from posttrain.parallelisms.compile import apply_compile


class CountMatmuls(TorchDispatchMode):
    """Counts the matmuls torch runs whose left operand has `rows` rows (the projections of x)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows, self.count = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            left = args[1] if func is torch.ops.aten.addmm.default else args[0]
            self.count += left.shape[0] == self.rows
        return func(*args, **(kwargs or {}))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, "debug", "cpu")
    model.init_weights()
    return model


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(tokens).float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tokens(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _set_fusion(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(Attention, "fuse_qkv", on)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gpt_oss"])  # gpt_oss: q/k/v biases
def test_one_matmul_gives_the_loss_and_gradients_of_three(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(name)
    tokens = _tokens(model)
    _set_fusion(monkeypatch, False)
    loss_ref, grads_ref = _loss_and_grads(model, tokens)
    _set_fusion(monkeypatch, True)
    loss, grads = _loss_and_grads(model, tokens)
    assert torch.allclose(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert torch.allclose(g, grads_ref[n], rtol=1e-5, atol=1e-7), n
    # each gradient of a q/k/v weight is its own contiguous tensor, as the optimizer expects
    attn = model.layers["0"].attention
    for lin in (attn.wq, attn.wk, attn.wv):
        assert lin.weight.grad.shape == lin.weight.shape and lin.weight.grad.is_contiguous()


def _forward_matmuls(model: torch.nn.Module, tokens: torch.Tensor, grad: bool) -> int:
    counter = CountMatmuls(tokens.numel())
    with torch.set_grad_enabled(grad), counter:
        model(tokens)
    return counter.count


def test_one_matmul_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama3")
    tokens = _tokens(model)
    n_layers = len(model.layers)
    per_layer_rest = 4  # wo, w1, w3, w2 (the head's matmul has rows too: counted once)
    _set_fusion(monkeypatch, True)
    assert _forward_matmuls(model, tokens, grad=True) == n_layers * (1 + per_layer_rest) + 1
    # decoding / evaluation reads each weight once: no stacked copy
    assert _forward_matmuls(model, tokens, grad=False) == n_layers * (3 + per_layer_rest) + 1
    _set_fusion(monkeypatch, False)
    assert _forward_matmuls(model, tokens, grad=True) == n_layers * (3 + per_layer_rest) + 1

    _set_fusion(monkeypatch, True)
    frozen = copy.deepcopy(model)
    frozen.layers["0"].attention.wk.weight.requires_grad_(False)
    assert _forward_matmuls(frozen, tokens, grad=True) == n_layers * (1 + per_layer_rest) + 1 + 2

    lora = copy.deepcopy(model)
    apply_lora(lora, rank=4, alpha=8, targets=["wq", "wv"])
    counted = _forward_matmuls(lora, tokens, grad=True)
    assert counted >= n_layers * (3 + per_layer_rest) + 1  # the base linears stay separate (plus adapters' A)


def test_one_matmul_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_fusion(monkeypatch, False)
    eager = _model("qwen3")
    tokens = _tokens(eager)
    loss_ref, grads_ref = _loss_and_grads(eager, tokens)
    _set_fusion(monkeypatch, True)
    compiled = _model("qwen3")
    apply_compile(compiled, device_type="cpu")
    loss, grads = _loss_and_grads(compiled, tokens)
    assert torch.allclose(loss, loss_ref, rtol=1e-5, atol=0)
    for n, g in grads.items():
        assert torch.allclose(g, grads_ref[n], rtol=1e-4, atol=1e-6), n
