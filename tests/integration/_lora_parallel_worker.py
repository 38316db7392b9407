"""Worker for tests/integration/test_lora_parallel.py, run under ``torchrun --nproc_per_node=2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _lora_parallel_worker.py LAYOUT [LAYOUT ...]`` with
LAYOUTs ``tp`` and / or ``fsdp``: a LoRA-adapted debug Qwen3 parallelized that way (with activation
checkpointing) gives the single-process loss and adapter gradients (and clipping norm), and its frozen
parameters get no gradient; a mismatch raises.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.config.sections import ActivationCheckpointSection, ParallelismSection
from posttrain.models.common.lora import apply_lora, init_lora_adapters, lora_modules
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import canonical_name, load_full_state_dict_sharded, local_shard
from posttrain.parallelisms import ParallelDims, clip_grad_norm_, get_parallelize_fn

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LORA = dict(rank=4, alpha=8.0, targets=ALL)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _loss(model, data, vocab):
    def ce(hidden, weight):
        return F.cross_entropy((hidden @ weight.t())[..., :vocab].flatten(0, 1).float(), data["labels"].flatten())

    return model(data["input_ids"], position_ids=data["position_ids"], document_ids=data["document_ids"],
                 output_fn=ce)


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {canonical_name(n): _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}


def main(layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True)
    try:
        for layout in layouts:
            check_layout(layout, dist.get_world_size())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_layout(layout: str, world: int) -> None:
    torch.manual_seed(0)
    ref = build_model("qwen3", "debug", device="cpu", attn_backend="sdpa")
    apply_lora(ref, **LORA)
    init_lora_adapters(ref, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(ref).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=gen) * 0.05)
    vocab = ref.args.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    data = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1),
            "position_ids": torch.arange(16).expand(2, 16).contiguous(),
            "document_ids": (torch.arange(16) >= 9).long().expand(2, 16).contiguous()}
    ref_loss = _loss(ref, data, vocab)
    ref_loss.backward()
    ref_grads = _adapter_grads(ref)

    dims = ParallelDims(1, -1 if layout == "fsdp" else 1, -1 if layout == "tp" else 1, world_size=world)
    dims.build_mesh("cpu")
    model = build_model("qwen3", "debug", device="meta", attn_backend="sdpa")
    apply_lora(model, **LORA)
    get_parallelize_fn("qwen3")(model, dims, mixed_precision="fp32",
                                ac=ActivationCheckpointSection(mode="full"), parallelism=ParallelismSection())
    model.to_empty(device="cpu")
    full = {canonical_name(n): p.detach() for n, p in ref.named_parameters()}
    load_full_state_dict_sharded(model, full)  # base weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # adapters: each rank copies its slice
                local, slices = local_shard(p)
                local.copy_(full[canonical_name(n)][slices])
    model.init_buffers()
    if layout == "fsdp":
        rows = slice(dims.dp_rank, dims.dp_rank + 1)
        mine = {k: v[rows] for k, v in data.items()}
    else:
        mine = data
    loss = _loss(model, mine, vocab)
    loss.backward()
    if layout == "tp":
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    else:  # FSDP averages gradients over ranks: each rank's loss is the mean over its own row
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, ref_loss, rtol=1e-5, atol=1e-5)
    grads = _adapter_grads(model)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * ref.args.n_layers, sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    norm = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.5)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=1e-6)
    if dist.get_rank() == 0:
        print(f"ok lora {layout}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
