"""GRPO's weight sync, timed through the loop's own code: `controller.sync_weights` between a policy actor and a
native engine actor (Ray), per transport of `grpo.weight_sync`.

    python benchmarks/bench_weight_sync.py --shapes smollm2-135m qwen3-1.7b --out weight_sync.json
    python benchmarks/bench_weight_sync.py --shapes tiny --device cpu          # CPU check (gloo)

The policy actor is a `PolicyWorker` whose trainer is replaced by a random-weight model of the shape
(`bench_rollout.SHAPES`, in `--dtype`); the engine actor a `RolloutWorker` whose NativeEngine holds the same
shape with other random weights. Transports:

* object_store: buckets gathered to host memory and streamed through the Ray object store (the default);
* cuda_ipc: CUDA IPC handles of buckets left on the policy's GPU (both actors on one GPU; CUDA only);
* collective: the weight-update group (NCCL on CUDA, gloo on CPU) of `posttrain/rl/weight_group.py`. NCCL
  refuses two ranks on one GPU, so on CUDA the engine gets a GPU of its own: with one visible GPU the row
  records that refusal instead of a time.

Each transport syncs `--calls` times (the first includes allocator growth and, for NCCL, the communicator's
setup); after the last call the engine's weights must equal the policy's (per-tensor sums, float64), checked
and recorded as `equal`. Times are wall clock of `sync_weights` (what `time/sync` logs). The markdown table is
printed last; `--out` gets JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

from bench_rollout import SHAPES, build
from measure import RESULTS_MARKER, environment, fmt, markdown_table, resolve_device, short_error, write_json

import torch  # noqa: E402  (measure puts the repo on sys.path first)

from posttrain.inference.native import NativeEngine  # noqa: E402
from posttrain.rl.controller import open_weight_group, quiet_ray_token_auth_notice, sync_weights  # noqa: E402
from posttrain.rl.workers import PolicyWorker, RolloutWorker  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _device(kind: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def _sums(model: torch.nn.Module) -> dict[str, float]:
    return {n: float(p.detach().double().sum()) for n, p in model.state_dict().items()}


class BenchPolicy(PolicyWorker):
    """The policy actor's weight-sync methods, on a bare model instead of a Trainer."""

    def __init__(self, shape: str, device: str, dtype: str) -> None:
        if device == "cpu":
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
        dev = _device(device)
        self.trainer = SimpleNamespace(model=build(shape, dev, DTYPES[dtype], seed=0), device=dev,
                                       close=lambda: None)

    def sums(self) -> dict[str, float]:
        return _sums(self.trainer.model)


class BenchEngine(RolloutWorker):
    """A RolloutWorker whose native engine is built from a random model of the shape (no checkpoint folder)."""

    def __init__(self, shape: str, device: str, dtype: str) -> None:
        if device == "cpu":
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
        self.device = _device(device)
        self.engine = NativeEngine(build(shape, self.device, DTYPES[dtype], seed=1), max_batch_size=1,
                                   max_seq_len=256, cuda_graphs=False)  # weights only: no generation here
        self.weight_group = None

    def sums(self) -> dict[str, float]:
        return _sums(self.engine.model)


def bench_transport(shape: str, transport: str, device: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    import ray

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    # cuda_ipc: both actors on one GPU (one bundle); otherwise a GPU each where there are two (with one GPU,
    # NCCL's refusal of two ranks on it is the collective row's result), as grpo.placement = "split" does
    shared = bool(gpus) and (transport == "cuda_ipc" or gpus < 2)
    bundle = {"CPU": 2, "GPU": 1} if gpus else {"CPU": 2}
    pg = placement_group([dict(bundle)] if shared else [dict(bundle), dict(bundle)], strategy="PACK")
    ray.get(pg.ready())

    def on(index: int) -> dict[str, Any]:
        return {"num_cpus": 1, "num_gpus": (0.5 if shared else 1) if gpus else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}

    row: dict[str, Any] = {"shape": shape, "transport": transport, "calls": [], "equal": None, "error": None}
    policy = ray.remote(BenchPolicy).options(**on(0)).remote(shape, device.type, a.dtype)
    engine = ray.remote(BenchEngine).options(**on(0 if shared else 1)).remote(shape, device.type, a.dtype)
    try:
        want, got = ray.get([policy.sums.remote(), engine.sums.remote()])  # both built before any timing
        row["differ_before"] = want != got
        if transport == "collective":
            t0 = time.perf_counter()
            open_weight_group([policy], [engine], a.timeout_s)
            row["setup_s"] = time.perf_counter() - t0
        for _ in range(a.calls):
            seconds, tensors = sync_weights([policy], [engine], a.bucket_mb * 2**20, transport)
            row["calls"].append(seconds)
            row["tensors"] = tensors
        want, got = ray.get([policy.sums.remote(), engine.sums.remote()])
        row["equal"] = want.keys() == got.keys() and all(want[k] == got[k] for k in want)
        ray.get([policy.close.remote(), engine.close.remote()])
    except Exception as err:  # noqa: BLE001 - recorded in the row (e.g. NCCL's refusal of one GPU for two ranks)
        row["error"] = short_error(getattr(err, "cause", None) or err)
    finally:
        ray.kill(policy)
        ray.kill(engine)
        remove_placement_group(pg)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen3-1.7b"], choices=sorted(SHAPES))
    p.add_argument("--transports", nargs="+", default=["object_store", "cuda_ipc", "collective"],
                   choices=["object_store", "cuda_ipc", "collective"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=30.0, help="the weight-update group's timeout")
    p.add_argument("--budget-s", type=float, default=0.0, help="no transport starts after this many seconds (0: none)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    t_start = time.perf_counter()
    device = resolve_device(a.device)
    transports = [t for t in a.transports if t != "cuda_ipc" or device.type == "cuda"]

    import ray

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    quiet_ray_token_auth_notice()
    here = os.path.dirname(os.path.abspath(__file__))  # the actors import posttrain and this folder's modules
    paths = [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]
    ray.init(address="local", num_cpus=8, num_gpus=gpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}})
    rows = []
    try:
        for shape in a.shapes:
            for transport in transports:
                if a.budget_s and time.perf_counter() - t_start > a.budget_s:
                    rows.append({"shape": shape, "transport": transport, "calls": [], "equal": None,
                                 "error": f"skipped: --budget-s {a.budget_s:.0f} spent"})
                    continue
                row = bench_transport(shape, transport, device, a)
                rows.append(row)
                write_json(a.out, {"env": {**environment(device), "gpus": gpus}, "dtype": a.dtype,
                                   "bucket_mb": a.bucket_mb, "rows": rows})  # a run cut short keeps its rows
                print(f"{shape} {transport}: {row['calls']} equal={row['equal']} error={row['error']}", flush=True)
    finally:
        ray.shutdown()

    table = [[r["shape"], r["transport"], r.get("tensors", "-"), fmt(r.get("setup_s"), ".3f"),
              " / ".join(f"{s:.3f}" for s in r["calls"]) or "-",
              f"{min(r['calls'][1:] or r['calls']):.3f}" if r["calls"] else "-",
              "-" if r["equal"] is None else r["equal"] and r["differ_before"], r["error"] or ""] for r in rows]
    print(RESULTS_MARKER)
    print(markdown_table(["shape", "transport", "tensors", "group setup s", "sync s (each call)", "best after first",
                          "equal", "error"], table))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
