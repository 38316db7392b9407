"""compile.recompute_pointwise: a compiled block saves the inputs of its norms and of the SwiGLU product instead of
their outputs (rebuilt in backward), with the same loss and gradients, and no matmul recomputed; blocks checkpointed
whole compile without it."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.registry import build_model
from posttrain.parallelisms.activation_checkpoint import apply_activation_checkpointing, block_to_compile
from posttrain.parallelisms.compile import apply_compile, set_pointwise_recompute

SEQ = 48


@pytest.fixture
def restore_partitioner():
    yield
    set_pointwise_recompute(False)  # torch's default, for the tests that run after this one
    torch._dynamo.reset()


def block_and_inputs(n_layers: int = 1):
    torch.manual_seed(0)
    model = build_model("qwen3", "debug", device="cpu", n_layers=n_layers, attn_backend="sdpa")
    x = torch.randn(1, SEQ, model.args.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cos, sin, mask = model.attention_inputs(torch.arange(SEQ)[None], None, x.dtype)["global"]
    return model, model.layers["0"], x, (cos, sin, mask)


def run(block, x, inputs, params: set[int]):
    """Output, the input and parameter gradients, and the shapes of the activations saved for backward."""
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, *inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, [x, *block.parameters()], grad_out)
    return out.detach(), grads, saved


def compiled_run(recompute: bool):
    """The min-cut partitioner of inductor without its code generation (fast on a CPU)."""
    torch._dynamo.reset()  # the setting is read when a graph is compiled
    set_pointwise_recompute(recompute)
    model, block, x, inputs = block_and_inputs()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    compiled = torch.compile(block, backend="aot_eager_decomp_partition", fullgraph=True)
    return run(compiled, x, inputs, params), model.args


def test_compiled_block_saves_inputs_not_pointwise_outputs_with_equal_grads(restore_partitioner):
    model, block, x, inputs = block_and_inputs()
    ref_out, ref_grads, _ = run(block, x, inputs, set())
    (out_keep, grads_keep, saved_keep), args = compiled_run(recompute=False)
    (out, grads, saved), _ = compiled_run(recompute=True)

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)

    def numel(shapes):
        return sum(torch.Size(s).numel() for s in shapes)

    def ffn_wide(shapes):  # [tokens, ffn_dim] activations: gate, up and (when saved) their SwiGLU product
        return sum(1 for s in shapes if torch.Size(s).numel() == SEQ * args.ffn_dim)

    assert ffn_wide(saved_keep) == 3 and ffn_wide(saved) == 2
    # the two norms' outputs (input of q/k/v and of w1/w3) are rebuilt too: at least dim + ffn_dim + dim fewer
    assert numel(saved_keep) - numel(saved) >= SEQ * (2 * args.dim + args.ffn_dim)


def test_apply_compile_sets_the_partitioner_from_the_config(restore_partitioner):
    model = build_model("qwen3", "debug", device="cpu", n_layers=1, attn_backend="sdpa")
    apply_compile(model, device_type="cpu", recompute_pointwise=True)
    assert torch._functorch.config.ban_recompute_materialized_backward is False
    apply_compile(model, device_type="cpu")  # the function's default: off (the config's default is on)
    assert torch._functorch.config.ban_recompute_materialized_backward is True


@pytest.mark.parametrize("mode, recompute", [("full", False), ("selective", True), ("op", True), ("none", True)])
def test_recompute_is_dropped_only_when_every_block_is_checkpointed_whole(mode, recompute, restore_partitioner):
    model = build_model("qwen3", "debug", device="cpu", n_layers=2, attn_backend="sdpa")
    apply_activation_checkpointing(model, mode, every_n=2)
    apply_compile(model, device_type="cpu", recompute_pointwise=True)
    assert torch._functorch.config.ban_recompute_materialized_backward is not recompute


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_copy_built_later_keeps_the_trained_models_setting(frozen, restore_partitioner, tmp_path):
    """A reference / teacher is built after the policy (with checkpointing off); the policy's graphs compile at
    their first call, after both builds, so a frozen build must not change the process-wide setting."""
    from dataclasses import replace

    from posttrain.config import parse_config
    from posttrain.trainer import build_training_model

    cfg = parse_config([
        "--model.name", "qwen3", "--model.flavor", "debug", "--model.attn_backend", "sdpa", "--training.device", "cpu",
        "--compile.enabled", "true", "--compile.recompute_pointwise", "true", "--activation_checkpoint.mode", "full",
        "--job.output_dir", str(tmp_path),
    ])
    kwargs = dict(parallel_dims=_single_process_dims(), device=torch.device("cpu"), mixed_precision="fp32",
                  tokenizer_vocab_size=0)
    build_training_model(cfg, **kwargs)
    policy_setting = torch._functorch.config.ban_recompute_materialized_backward
    assert policy_setting is True  # full checkpointing: recompute dropped (torch's default kept)
    reference_cfg = replace(cfg, activation_checkpoint=replace(cfg.activation_checkpoint, mode="none"))
    build_training_model(reference_cfg, frozen=frozen, **kwargs)
    # without frozen the reference's own choice (recompute on: no checkpointing) would win
    assert (torch._functorch.config.ban_recompute_materialized_backward is policy_setting) is frozen


def _single_process_dims():
    from posttrain.parallelisms import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, world_size=1)
    dims.build_mesh("cpu")
    return dims


def test_whole_checkpointed_blocks_compile_saving_pointwise_results(restore_partitioner):
    """With `skip_last`, the blocks checkpointed whole get their own graph that saves the SwiGLU product (their saved
    results live only during their own backward, where rebuilding it raised the peak); the unwrapped blocks keep the
    recompute. Both stay equal to eager, through the checkpoint too."""
    torch._dynamo.reset()
    model, _, x, inputs = block_and_inputs(n_layers=2)
    eager, _, _, _ = block_and_inputs(n_layers=2)
    apply_activation_checkpointing(model, "full", skip_last=1)
    apply_compile(model, device_type="cpu", recompute_pointwise=True, backend="aot_eager_decomp_partition")
    assert torch._functorch.config.ban_recompute_materialized_backward is False  # the unwrapped block's setting
    checkpointed, unwrapped = model.layers["0"], model.layers["1"]
    assert block_to_compile(checkpointed) is not checkpointed and block_to_compile(unwrapped) is unwrapped

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ffn = SEQ * model.args.ffn_dim
    for block, ffn_wide_saved in ((block_to_compile(checkpointed), 3), (unwrapped, 2)):
        out, grads, saved = run(block, x, inputs, params)
        ref_out, ref_grads, _ = run(eager.layers["0" if block is not unwrapped else "1"], x, inputs, set())
        assert sum(1 for s in saved if torch.Size(s).numel() == ffn) == ffn_wide_saved
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)

    def two_blocks(m):
        return m.layers["1"](m.layers["0"](x, *inputs), *inputs)

    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(two_blocks(model), [x, *model.layers.parameters()], grad_out)
    want = torch.autograd.grad(two_blocks(eager), [x, *eager.layers.parameters()], grad_out)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
