"""Worker for tests/integration/test_fsdp_tp.py, run under ``torchrun --nproc_per_node=N`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _parallel_worker.py CASE OUT_DIR [HF_DIR ...]``
Each case compares parallel runs against the single-process model that every rank also builds; a failed
comparison raises (non-zero exit, traceback in the output). Rank 0 writes ``OUT_DIR/CASE.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from posttrain.config.sections import ActivationCheckpointSection, ParallelismSection
from posttrain.models.registry import build_model
from posttrain.models.sharded_load import (
    canonical_name,
    init_weights_sharded,
    load_full_state_dict_sharded,
    load_hf_weights_sharded,
)
from posttrain.parallelisms import ParallelDims, clip_grad_norm_, get_parallelize_fn

RANK = 0
WORLD = 1
TOL = dict(rtol=1e-5, atol=1e-5)  # logits, losses: O(1)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)  # gradients: O(1e-3), summed in a different order


def log(msg: str) -> None:
    if RANK == 0:
        print(msg, flush=True)


def batch(vocab: int, b: int = 4, s: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    # two packed documents per row: positions restart, document ids from the split point
    split = s // 2 + 3
    pos = torch.cat([torch.arange(split), torch.arange(s - split)]).expand(b, s).contiguous()
    doc = (torch.arange(s) >= split).long().expand(b, s).contiguous()
    labels = torch.roll(ids, -1, dims=1)
    return {"input_ids": ids, "position_ids": pos, "document_ids": doc, "labels": labels}


def ce_output_fn(labels: torch.Tensor, vocab: int):
    """A tiny stand-in for the chunked loss: hidden @ weight.T, padded columns dropped, mean CE."""

    def fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logits = (hidden @ weight.t())[..., :vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return fn


def run(model, data, vocab, use_output_fn: bool, loss_parallel: bool = False):
    kw = dict(position_ids=data["position_ids"], document_ids=data["document_ids"])
    if loss_parallel:  # logits stay vocab-sharded DTensors; the cross-entropy runs on the shards
        from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx

        logits = model(data["input_ids"], **kw)
        with loss_parallel_ctx():
            loss = F.cross_entropy(logits.flatten(0, 1).float(), data["labels"].flatten())
            loss.backward()
        return logits.full_tensor(), loss.full_tensor()
    if use_output_fn:
        loss = model(data["input_ids"], **kw, output_fn=ce_output_fn(data["labels"], vocab))
        return None, loss
    logits = model(data["input_ids"], **kw)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), data["labels"].flatten())
    return logits, loss


def grads_by_name(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        out[canonical_name(name)] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def params_by_name(model) -> dict[str, torch.Tensor]:
    return {
        canonical_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        for n, p in model.named_parameters()
    }


def dims_for(layout: str, device_type: str = "cpu") -> ParallelDims:
    degrees = {
        "fsdp": (1, -1, 1),
        "tp": (1, 1, -1),
        "replicate": (-1, 1, 1),
        "hsdp": (2, -1, 1),
        "fsdp_tp": (1, -1, 2),
    }[layout]
    dims = ParallelDims(*degrees, world_size=WORLD)
    dims.build_mesh(device_type)
    return dims


def parallel_model(family: str, layout: str, ac_mode: str = "none", loss_parallel: bool = False,
                   offload_blocks: int = 0, **overrides):
    dims = dims_for(layout)
    model = build_model(family, "debug", device="meta", attn_backend="sdpa", **overrides)
    get_parallelize_fn(family)(
        model,
        dims,
        mixed_precision="fp32",
        ac=ActivationCheckpointSection(mode=ac_mode, every_n=2, offload_blocks=offload_blocks),
        parallelism=ParallelismSection(loss_parallel=loss_parallel),
    )
    model.to_empty(device="cpu")
    return model, dims


def local_rows(data: dict[str, torch.Tensor], dims: ParallelDims) -> dict[str, torch.Tensor]:
    n = dims.dp_degree
    if n == 1:
        return data
    b = data["input_ids"].shape[0] // n
    return {k: v[dims.dp_rank * b : (dims.dp_rank + 1) * b] for k, v in data.items()}


def compare_to_reference(family: str, layout: str, *, ac_mode: str = "none", use_output_fn: bool = False,
                         loss_parallel: bool = False, offload_blocks: int = 0, **overrides) -> None:
    torch.manual_seed(0)
    ref = build_model(family, "debug", device="cpu", attn_backend="sdpa", **overrides)
    vocab = ref.args.vocab_size
    data = batch(vocab)
    ref_logits, ref_loss = run(ref, data, vocab, use_output_fn)
    ref_loss.backward()
    ref_grads = grads_by_name(ref)

    model, dims = parallel_model(family, layout, ac_mode, loss_parallel, offload_blocks, **overrides)
    load_full_state_dict_sharded(model, dict(ref.named_parameters()))
    model.init_buffers()
    mine = local_rows(data, dims)
    logits, loss = run(model, mine, vocab, use_output_fn, loss_parallel)
    if not loss_parallel:
        loss.backward()
    if logits is not None:
        rows = mine["input_ids"].shape[0]
        start = dims.dp_rank * rows
        torch.testing.assert_close(logits, ref_logits[start : start + rows], **TOL)
    if dims.dp_degree == 1:
        torch.testing.assert_close(loss, ref_loss, **TOL)
    if offload_blocks:  # the blocks' saved activations went through the host copies
        from posttrain.parallelisms.activation_offload import activation_offloader

        assert activation_offloader(model).stats.offloaded > 0, activation_offloader(model).stats
    grads = grads_by_name(model)
    assert set(grads) == set(ref_grads), (sorted(grads), sorted(ref_grads))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL, msg=lambda m: f"{family} {layout} {name}: {m}")

    # clipping over DTensors gives the single-process norm and clipped gradients
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    norm = clip_grad_norm_(model.parameters(), 0.5)
    # fp32 norms over ~1e5 elements differ by ~1e-5 relative with the summation order
    torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=1e-6)
    clipped, ref_clipped = grads_by_name(model), grads_by_name(ref)
    for name in clipped:
        torch.testing.assert_close(clipped[name], ref_clipped[name], **GRAD_TOL)
    log(f"ok {family} {layout} ac={ac_mode} offload={offload_blocks} output_fn={use_output_fn} "
        f"loss_parallel={loss_parallel} {overrides}")


# ------------------------------------------------------------------------------------------------ cases


def case_equivalence(out: Path, hf_dirs: list[str]) -> dict:
    for family in ("qwen3", "llama3"):
        for layout in ("fsdp", "tp", "replicate"):
            compare_to_reference(family, layout)
        compare_to_reference(family, "tp", use_output_fn=True)
        compare_to_reference(family, "tp", loss_parallel=True)
    # padded vocabulary (2000 -> 2048) with TP and FSDP, tied (qwen3) and untied (llama3)
    compare_to_reference("qwen3", "tp", vocab_size=2000, use_output_fn=True)
    compare_to_reference("llama3", "fsdp", vocab_size=2000)
    return {"ok": True}


def case_ac(out: Path, hf_dirs: list[str]) -> dict:
    for mode in ("full", "selective", "op"):
        compare_to_reference("qwen3", "fsdp", ac_mode=mode)
    compare_to_reference("llama3", "tp", ac_mode="op")
    # activation offloading under FSDP (all-gathered parameters stay) and TP (DTensor parameters); the debug
    # model's tensors are under the size threshold, so it is lowered here
    import posttrain.parallelisms.activation_offload as offload

    offload.MIN_OFFLOAD_BYTES = 0
    compare_to_reference("qwen3", "fsdp", offload_blocks=1)
    compare_to_reference("llama3", "tp", offload_blocks=1)
    return {"ok": True}


def case_fsdp_tp(out: Path, hf_dirs: list[str]) -> dict:
    """4 ranks: FSDP x TP (2 x 2) and HSDP (2 x 2) against one process."""
    compare_to_reference("qwen3", "fsdp_tp")
    compare_to_reference("llama3", "fsdp_tp", use_output_fn=True, vocab_size=2000)
    compare_to_reference("qwen3", "hsdp")
    return {"ok": True}


def case_load(out: Path, hf_dirs: list[str]) -> dict:
    """Sharded HF loading equals load_hf, for each layout; random init equals the one-process init."""
    from posttrain.models.hf import load_hf, read_hf_config

    layouts = ("fsdp", "tp") if WORLD == 2 else ("fsdp_tp", "hsdp")
    for hf_dir in hf_dirs:
        config = read_hf_config(hf_dir)
        family = "qwen3" if config["model_type"] == "qwen3" else "llama3"
        ref = params_by_name(load_hf(hf_dir))
        for layout in layouts:
            model, _ = parallel_model(family, layout, ac_mode="op", vocab_size=config["vocab_size"])
            load_hf_weights_sharded(model, hf_dir)
            got = params_by_name(model)
            assert set(got) == set(ref), (sorted(got), sorted(ref))
            for name, t in got.items():
                torch.testing.assert_close(t, ref[name], rtol=0, atol=0, msg=lambda m: f"{layout} {name}: {m}")
            log(f"ok sharded load {family} {layout}")

    torch.manual_seed(7)
    ref_init = params_by_name(build_model("qwen3", "debug", device="cpu"))
    for layout in layouts:
        model, _ = parallel_model("qwen3", layout, ac_mode="full")
        init_weights_sharded(model, seed=7)
        for name, t in params_by_name(model).items():
            torch.testing.assert_close(t, ref_init[name], rtol=0, atol=0)
        log(f"ok sharded init {layout}")
    return {"ok": True}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def case_rss(out: Path, hf_dirs: list[str]) -> dict:
    """Peak RSS growth of each rank while materializing + loading its shards (FSDP over all ranks)."""
    from posttrain.models.hf import read_hf_config, spec_for_hf_config

    hf_dir = hf_dirs[0]
    config = read_hf_config(hf_dir)
    spec = spec_for_hf_config(config)
    args = spec.args_from_hf_config(config)
    dims = dims_for("fsdp")
    model = build_model(spec.name, args, device="meta")
    get_parallelize_fn(spec.name)(model, dims, mixed_precision="fp32")
    dist.barrier()
    before = _status_kib("VmRSS")
    try:  # reset the high-water mark so that earlier peaks (imports) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    model.to_empty(device="cpu")
    load_hf_weights_sharded(model, hf_dir)
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    stats = torch.tensor([peak - before, after - before, local_bytes // 1024], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(WORLD)]
    dist.all_gather(gathered, stats)
    return {
        "hwm_reset": hwm_reset,
        "peak_growth_kib": [int(g[0]) for g in gathered],
        "final_growth_kib": [int(g[1]) for g in gathered],
        "local_param_kib": [int(g[2]) for g in gathered],
    }


def case_gpu_smoke(out: Path, hf_dirs: list[str]) -> dict:
    """On GPUs (nccl): flex attention + op-level AC + compile + bf16 FSDP / TP train a few steps; sharded
    init is compared across layouts and with a one-device init. Not part of the CPU test suite."""
    from posttrain.config.sections import CompileSection

    device = torch.device("cuda", torch.cuda.current_device())
    size = dict(dim=1024, n_layers=4, n_heads=16, n_kv_heads=8, head_dim=64, ffn_dim=3072, vocab_size=32000)
    torch.manual_seed(5)
    single = params_by_name(build_model("qwen3", "debug", device=device, **size))
    result: dict = {}
    inits = {}
    for layout in ("fsdp", "tp"):
        dims = dims_for(layout, "cuda")
        model = build_model("qwen3", "debug", device="meta", attn_backend="flex", **size)
        get_parallelize_fn("qwen3")(
            model, dims, mixed_precision="bf16", ac=ActivationCheckpointSection(mode="op"),
            compile=CompileSection(enabled=True), parallelism=ParallelismSection(),
        )
        model.to_empty(device=device)
        init_weights_sharded(model, seed=5)
        inits[layout] = params_by_name(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = {k: v.to(device) for k, v in batch(32000, b=8, s=512, seed=2).items()}
        losses = []
        for _ in range(4):
            mine = local_rows(data, dims)
            kw = dict(position_ids=mine["position_ids"], document_ids=mine["document_ids"])
            loss = model(mine["input_ids"], **kw, output_fn=ce_output_fn(mine["labels"], 32000))
            loss.backward()
            norm = clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            reduced = loss.detach().clone()
            if dims.dp_degree > 1:
                dist.all_reduce(reduced, group=dims.dp_mesh.get_group())
                reduced /= dims.dp_degree
            losses.append((round(reduced.item(), 5), round(norm.item(), 5)))
        result[layout] = {"loss_and_grad_norm": losses, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        log(f"{layout}: {result[layout]}")
    diff_layouts = max((inits["fsdp"][k] - inits["tp"][k]).abs().max().item() for k in single)
    diff_single = max((inits["fsdp"][k] - single[k]).abs().max().item() for k in single)
    result["init_max_diff_fsdp_vs_tp"] = diff_layouts
    result["init_max_diff_fsdp_vs_single_device"] = diff_single
    log(f"init diffs: layouts {diff_layouts}, vs single device {diff_single}")
    return result


CASES = {
    "gpu_smoke": case_gpu_smoke,
    "equivalence": case_equivalence,
    "ac": case_ac,
    "fsdp_tp": case_fsdp_tp,
    "load": case_load,
    "rss": case_rss,
}


def main() -> None:
    global RANK, WORLD
    case, out = sys.argv[1], Path(sys.argv[2])
    hf_dirs = sys.argv[3:]
    if case.startswith("gpu"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cuda:nccl,cpu:gloo")
    else:
        dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if not case.startswith("gpu"):
        torch.use_deterministic_algorithms(True)
    try:
        result = CASES[case](out, hf_dirs)
        if RANK == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{case}.json").write_text(json.dumps(result))
        dist.barrier()  # gloo aborts a rank whose peer tears the group down first
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
