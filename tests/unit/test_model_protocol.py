"""The optional model hooks (posttrain/models/protocol.py): one reader per declared hook, its default for a model
without it, and the model's own answer when it has one."""

from __future__ import annotations

import inspect

import torch

from posttrain.models import build_model
from posttrain.models import protocol as model_hooks
from posttrain.models.protocol import OptionalModelHooks


def _declared_hooks() -> list[str]:
    return [n for n, _ in inspect.getmembers(OptionalModelHooks, inspect.isfunction) if not n.startswith("_")]


def test_every_declared_hook_has_one_reader():
    hooks = _declared_hooks()
    assert set(hooks) >= {"moe_aux_loss", "moe_metrics", "param_active_fraction", "mfu_unavailable_reason"}
    for name in hooks:
        assert callable(getattr(model_hooks, name)), f"no reader for hook {name}"


def test_a_model_without_the_hooks_gets_the_defaults():
    model = torch.nn.Linear(2, 2)
    assert model_hooks.moe_aux_loss(model) is None
    assert model_hooks.moe_metrics(model) == {}
    assert model_hooks.param_active_fraction(model, "weight") == 1.0
    assert model_hooks.mfu_unavailable_reason(model, 128) is None
    model_hooks.init_buffers(model, "cpu")  # nothing to do, and no error


def test_an_moe_model_answers_with_its_own_hooks():
    torch.manual_seed(0)
    model = build_model("qwen3_moe", "debug", device="cpu")
    args = model.args
    model(torch.randint(0, args.vocab_size, (2, 16)))
    aux = model_hooks.moe_aux_loss(model)
    assert aux is not None and aux.requires_grad and float(aux) > 0
    assert set(model_hooks.moe_metrics(model)) == {"moe_aux_loss", "moe_load_imbalance"}
    expert = next(n for n, _ in model.named_parameters() if ".experts." in n)
    assert model_hooks.param_active_fraction(model, expert) == args.n_experts_per_tok / args.n_experts
    assert model_hooks.param_active_fraction(model, "tok_embeddings.weight") == 1.0
