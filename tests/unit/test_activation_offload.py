"""Activation offloading (`activation_checkpoint.offload_blocks`): the chosen blocks' saved tensors go through the
offloader (on the CPU a copy in the same memory: the bookkeeping, not the saving, is what runs here), loss and
gradients equal the plain model's bit for bit in eager and compiled, parameters and small tensors stay, each offloaded block
is brought back as the block two places after it starts its backward, state-dict keys are unchanged, and bad
settings are refused with the key named. On the GPU (memory saved, streams): tests/gpu/test_cuda_activation_offload.py."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import posttrain.parallelisms.activation_offload as offload
from posttrain.config import ConfigError, load_config, parse_config
from posttrain.models.registry import build_model
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing
from posttrain.parallelisms.activation_offload import (
    ActivationOffloader,
    OffloadingBlock,
    activation_offloader,
    apply_activation_offloading,
)
from posttrain.parallelisms.compile import apply_compile
from sft_data_fakes import random_token_batches


def _model(n_layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return build_model("llama3", "debug", "cpu", n_layers=n_layers)


def _grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(ids).float().pow(2).mean()
    loss.backward()
    # the wrapper adds a segment to parameter names, as activation checkpointing's does (state_dict() strips it)
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, skip_last, n_blocks, compiled", [
    ("none", 0, 2, False), ("none", 0, 2, True), ("full", 3, 2, False), ("full", 3, 2, True), ("op", 2, 2, False),
])
def test_offloaded_blocks_give_the_same_loss_and_gradients(mode: str, skip_last: int, n_blocks: int,
                                                           compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)  # the debug model's tensors are small
    results = []
    for blocks in (0, n_blocks):
        torch._dynamo.reset()
        model = _model()
        apply_activation_checkpointing(model, mode, skip_last=skip_last)
        offloader = apply_activation_offloading(model, blocks)
        if compiled:
            apply_compile(model, device_type="cpu", backend="aot_eager")
        results.append(_grads(model))
        if blocks:
            stats = offloader.stats
            assert stats.offloaded > 0 and stats.kept > 0, stats
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        assert torch.equal(results[1][1][name], grad), name


@pytest.mark.parametrize("n_layers, skip_last, wrapped_as, order", [
    # blocks 3-7 unwrapped; 3 and 4 offload and come back as the backward of 5 and 6 begins (two blocks ahead)
    (8, 5, {3: (True, ()), 4: (True, ()), 5: (False, (3,)), 6: (False, (4,))}, [4, 3]),
    # blocks 3-5 unwrapped: the last block brings both back, the later one first
    (6, 3, {3: (True, ()), 4: (True, ()), 5: (False, (4, 3))}, [4, 3]),
])
def test_which_blocks_offload_and_which_bring_back_which(n_layers: int, skip_last: int, wrapped_as: dict,
                                                         order: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    model = _model(n_layers=n_layers)
    apply_activation_checkpointing(model, "full", skip_last=skip_last)
    offloader = apply_activation_offloading(model, 2)
    wrapped = {i: m for i, m in enumerate(model.layers.children()) if isinstance(m, OffloadingBlock)}
    assert {i: (m.offload, m.prefetches) for i, m in wrapped.items()} == wrapped_as
    assert activation_offloader(model) is offloader
    calls = []
    monkeypatch.setattr(offloader, "prefetch", lambda block: calls.append(block))
    _grads(model)
    assert calls == order  # in backward order
    assert set(offloader._blocks) == {3, 4}


def test_parameters_small_and_shared_tensors_stay() -> None:
    offloader = ActivationOffloader()
    linear = nn.Linear(512, 512)
    parameters = {p.untyped_storage().data_ptr() for p in linear.parameters()}
    big = torch.randn(1024, 512)
    grads = []
    for hooks in (offloader.hooks(0, parameters), None):
        x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0), requires_grad=True)  # 2 MiB
        with hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = linear(x).relu()  # saves x (the caller's leaf), the weight (a parameter), relu's output
            z = big[:10] * y[:10]  # saves a view of `big` (its storage holds more: it stays)
        z.sum().backward()
        grads.append(x.grad)
    assert offloader.stats.offloaded == 1  # relu's output
    assert offloader.stats.offloaded_bytes == 1024 * 512 * 4
    assert offloader.stats.kept == 3  # x, the weight, big[:10] (y[:10] is not saved: big needs no gradient)
    assert torch.equal(grads[0], grads[1])


def test_state_dict_keys_and_loading_are_unchanged() -> None:
    plain, wrapped = _model(), _model()
    apply_activation_offloading(wrapped, 2)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    wrapped.load_state_dict(plain.state_dict())


def test_refusals_name_the_setting() -> None:
    model = _model()
    apply_activation_checkpointing(model, "full", skip_last=1)
    with pytest.raises(ValueError, match="offload_blocks = 2, but only 1 of the 4 blocks are not checkpointed"):
        apply_activation_offloading(model, 2)
    model = _model()
    apply_activation_checkpointing(model, "selective", every_n=2)
    with pytest.raises(ValueError, match="not consecutive"):
        apply_activation_offloading(model, 2)
    assert apply_activation_offloading(_model(), 0) is None
    with pytest.raises(ValueError, match=">= 0"):
        apply_activation_offloading(_model(), -1)
    base = ["--config", "train_configs/debug_sft.toml"]
    with pytest.raises(ConfigError, match="compile.cudagraphs cannot be combined with activation_checkpoint.offload"):
        parse_config(base + ["--compile.enabled", "true", "--compile.cudagraphs", "true",
                             "--activation_checkpoint.offload_blocks", "1"])
    for extra, message in (
        (["--activation_checkpoint.offload_blocks", "-1"], "must be >= 0"),
        (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.offload_blocks", "1"],
         "selective"),
        (["--activation_checkpoint.mode", "full", "--activation_checkpoint.skip_last", "1",
          "--activation_checkpoint.offload_blocks", "2"], "exceeds skip_last = 1"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            parse_config(base + extra)
        assert "activation_checkpoint.offload_blocks" in str(err.value)


def test_trainer_logs_what_it_offloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from posttrain.recipes.sft import build_loss_fn
    from posttrain.trainer import Trainer

    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    losses = {}
    for blocks in (0, 1):
        cfg = load_config(["--config", "train_configs/debug_sft.toml", "--job.output_dir", str(tmp_path / str(blocks)),
                           "--metrics.tensorboard", "false", "--training.batch_size", "2", "--training.seq_len", "16",
                           "--activation_checkpoint.offload_blocks", str(blocks)])
        with caplog.at_level("WARNING", logger="posttrain"):
            trainer = Trainer(cfg)
        try:
            trainer.data_loader = random_token_batches(2)
            steps = [trainer.train_step(build_loss_fn(cfg)) for _ in range(2)]
        finally:
            trainer.close()
        losses[blocks] = [s["loss"] for s in steps]
        if blocks:
            assert all(s["offload/gib"] > 0 and s["offload/fetched_on_demand"] == 0 for s in steps), steps
            assert "nothing is saved" in caplog.text  # a CPU run says offloading buys nothing there
        else:
            assert "offload/gib" not in steps[0]
    assert losses[1] == losses[0]


def test_a_graph_dropped_without_backward_frees_what_it_saved() -> None:
    """Kept tensors pack as detached aliases: a saved output holding itself would live on in a reference cycle."""
    offloader = ActivationOffloader()
    x = torch.randn(64, 64, requires_grad=True)
    with offloader.hooks(0, set()):
        y = x.exp()  # saves its own output (small: kept on the device)
        z = y.sum()
    alive = weakref.ref(y)
    del y, z
    assert alive() is None and offloader.stats.kept == 1


def test_one_host_copy_per_storage_and_views_come_back_as_views(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    offloader = ActivationOffloader()
    grads = []
    for hooks in (offloader.hooks(0, set()), None):
        leaf = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            x = leaf * 1.0
            a = x * 2
            out = (a.t() * x.t()).sum() + (a * a).sum()  # a saved as its transpose and as itself (twice)
        out.backward()
        grads.append(leaf.grad)
    assert offloader.stats.offloaded == 2 and offloader.stats.offloaded_bytes == 2 * 8 * 6 * 4  # a's and x's storage
    assert torch.equal(grads[0], grads[1])


def test_rope_tables_and_autocast_weight_casts_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    model = _model(n_layers=2)
    offloader = apply_activation_offloading(model, 1)
    sent, real_send = [], offloader._send
    monkeypatch.setattr(offloader, "_send", lambda t: sent.append(t) or real_send(t))
    tables, real_inputs = [], model.attention_inputs
    monkeypatch.setattr(model, "attention_inputs",
                        lambda *a: (inputs := real_inputs(*a)) and tables.extend(inputs["global"][:2]) or inputs)
    _grads(model)
    rope = {t.untyped_storage().data_ptr() for t in tables}
    assert len(rope) == 2 and sent and not rope & {t.untyped_storage().data_ptr() for t in sent}
    # eager autocast: the bf16 copy of the weight is a cast of a parameter (kept); the activation's cast is sent
    linear, sent[:] = nn.Linear(64, 48), []
    offloader = ActivationOffloader()
    monkeypatch.setattr(offloader, "_send", lambda t: sent.append(t) or real_send(t))
    h = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), offloader.hooks(0, set()):
        out = linear(h * 2.0)
    out.float().pow(2).sum().backward()
    assert [(tuple(t.shape), t.dtype) for t in sent] == [((32, 64), torch.bfloat16)]


def test_sharded_parameters_are_read_through_their_local_shard(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor parallelism's DTensor parameters: their storage is their shard's (a DTensor's own has no data)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    class Sharded(nn.Module):
        def __init__(self, mesh) -> None:
            super().__init__()
            self.weight = nn.Parameter(distribute_tensor(torch.randn(16, 16), mesh, [Replicate()]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.weight.to_local()).relu()

    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        block = OffloadingBlock(Sharded(init_device_mesh("cpu", (1,))), ActivationOffloader(), 0, offload=True,
                                prefetches=())
        x = torch.randn(4, 16, requires_grad=True)
        block(x * 1.0).sum().backward()
        assert block.offloader.stats.offloaded >= 1 and x.grad is not None
    finally:
        dist.destroy_process_group()


def test_the_dry_run_estimate_leaves_offloaded_blocks_out_on_a_gpu() -> None:
    from posttrain.config import config_from_dict
    from posttrain.dry_run import _model_args, count_parameters, estimate_memory_gib
    from posttrain.parallelisms import ParallelDims

    def activations(ac: dict, device: str) -> float:
        cfg = config_from_dict({"model": {"name": "llama3", "flavor": "1B", "dtype": "bfloat16"},
                                "training": {"seq_len": 4096, "batch_size": 1, "device": device},
                                "activation_checkpoint": ac}, source="test")
        spec, args = _model_args(cfg)
        with torch.device("meta"):
            model = spec.model_cls(args)
        dims = ParallelDims(1, 1, 1, world_size=1)
        return estimate_memory_gib(cfg, args, count_parameters(model), dims, device == "cuda")["activations"]

    plain, offloading = activations({}, "cuda"), activations({"offload_blocks": 4}, "cuda")
    assert offloading == pytest.approx(plain * 12 / 16)  # 4 of 16 blocks' saved tensors in host memory
    assert activations({"offload_blocks": 4}, "cpu") == activations({}, "cpu")  # the host copy saves nothing there
