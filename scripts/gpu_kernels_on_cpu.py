"""The Triton kernels inductor would build for a compiled block on a GPU, and the bytes each moves, on a CPU machine.

    python scripts/gpu_kernels_on_cpu.py --model llama3 --flavor 1B --tokens 8192 [--no-recompute-pointwise]
        [--rms-norm-backward triton] [--float8 tensorwise] [--code DIR]

Device time is scarce; which fusions a change to a block buys can be read before it is measured. One block of the
model (bf16, `n_layers = 1`) is compiled through `aot_autograd` with inductor's decompositions and the min-cut
partitioner (pointwise recompute as `compile.recompute_pointwise`), and inductor's Triton scheduling runs for the CPU
device (`cpu_backend = "triton"`) with its mix-order reduction allowed as on CUDA. For each graph (forward,
backward) it prints every fused kernel with the ops it fuses and the bytes it reads and writes (inductor's own count
per scheduler node), and the extern kernels (matmuls, attention, custom ops: not counted). The time column is the
bytes at `--tb-s` (3.9 TB/s: what the H200's norm and SwiGLU kernels reached in the session-17 profile,
BENCHMARKS.md session 19). The block then runs in eager on the CPU (nothing built here is executable).

What differs from a GPU: inductor lowers every `cat` to a copy kernel on the CPU device where a GPU may fuse it
(RoPE's `rotate_half` shows as three kernels a tensor), and block sizes are the CPU's. The kernels of the norms and
the SwiGLU carried the names of the H200's (torch 2.11). This uses inductor internals (`cpu_backend`, the backend
hash, the mix-order check): a torch without them is refused with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Kernel:
    name: str  # the fused ops (inductor kernels) or the extern kernel's name
    nbytes: int  # read + written, inductor's count (0 for extern kernels)
    extern: bool


@dataclass
class GraphKernels:
    phase: str
    kernels: list[Kernel] = field(default_factory=list)
    saved_bytes: int | None = None  # forward: what it keeps for the backward (its outputs but the block's output)

    @property
    def inductor_bytes(self) -> int:
        return sum(k.nbytes for k in self.kernels if not k.extern)


class Unsupported(RuntimeError):
    pass


@contextlib.contextmanager
def _gpu_style_codegen(code_dir: Path | None) -> Iterator[None]:
    """Inductor's Triton code generation for the CPU device, with the mix-order reduction a GPU gets; undone after."""
    import torch._inductor.config as inductor_config
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as triton_utils

    if not triton_utils.has_triton_package():
        raise Unsupported("Triton is not installed: inductor's Triton code generation needs it")
    if not hasattr(inductor_config, "cpu_backend") or not hasattr(triton_utils, "triton_hash_with_backend"):
        raise Unsupported(f"torch {torch.__version__}: no inductor cpu_backend / triton_hash_with_backend")
    mix = getattr(scheduler, "MixOrderReduction", None)
    if mix is None:
        raise Unsupported(f"torch {torch.__version__}: inductor has no mix-order reduction")
    settings: dict[str, Any] = {"cpu_backend": "triton", "fx_graph_cache": False}  # a cached graph is not generated
    if code_dir is not None:
        code_dir.mkdir(parents=True, exist_ok=True)
        settings.update({"trace.enabled": True, "trace.debug_dir": str(code_dir)})
    undo = [(triton_utils, "triton_hash_with_backend", triton_utils.triton_hash_with_backend)]
    # the hash asks Triton's driver for the current target; there is no GPU driver here
    triton_utils.triton_hash_with_backend = lambda: "posttrain-gpu-kernels-on-cpu"
    if hasattr(scheduler, "_is_gpu_triton_backend"):  # torch >= 2.12: the mix-order check's device test
        undo.append((scheduler, "_is_gpu_triton_backend", scheduler._is_gpu_triton_backend))
        scheduler._is_gpu_triton_backend = lambda node1, node2: True
    else:
        undo.append((mix, "can_fuse", mix.__dict__["can_fuse"]))
        mix.can_fuse = _mix_order_check_without_device(scheduler, mix)
    try:
        with inductor_config.patch(settings):
            yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


def _mix_order_check_without_device(scheduler: Any, mix: Any) -> classmethod:
    """torch 2.11's MixOrderReduction.can_fuse with its two device tests (a GPU, the cuda / xpu Triton backend)
    taken out of inductor's own source."""
    source = textwrap.dedent(inspect.getsource(mix.can_fuse.__func__))
    patched, n_gpu = re.subn(r"if not node1\.is_gpu\(\) or not node2\.is_gpu\(\):", "if False:", source)
    patched, n_device = re.subn(r'if \(\s*device_type not in \("cuda", "xpu"\)\s*or get_current_backend\(device_type\)'
                                r' != "triton"\s*\):', "if False:", patched)
    if (n_gpu, n_device) != (1, 1):
        raise Unsupported(f"torch {torch.__version__}: inductor's mix-order check is not the one this script knows")
    namespace = dict(vars(scheduler))
    exec(compile(patched.replace("@classmethod\n", "", 1), scheduler.__file__, "exec"), namespace)  # noqa: S102
    return classmethod(namespace["can_fuse"])


def _fused_ops(node: Any) -> str:
    ops = set()
    for sub in node.get_nodes():
        for origin in getattr(getattr(sub, "node", None), "origins", ()) or ():
            if origin.op == "call_function":
                ops.add(str(origin.target).replace("aten.", "").replace(".default", ""))
    return ",".join(sorted(ops)) or node.get_name()


def _recording_scheduler(graphs: list[GraphKernels], phase: list[str]) -> Callable[[], None]:
    """Scheduler.codegen records each graph's kernels before generating them; returns the undo."""
    import torch._inductor.scheduler as scheduler

    original = scheduler.Scheduler.codegen

    def codegen(self: Any) -> Any:
        graph = GraphKernels(phase[0])
        for node in self.nodes:
            if isinstance(node, scheduler.ExternKernelSchedulerNode):
                name = getattr(node.node, "python_kernel_name", None) or type(node.node).__name__
                if name != "MultiOutput":
                    graph.kernels.append(Kernel(str(name), 0, extern=True))
            else:
                # a row and a column reduction in one kernel (the weight gradient of a norm beside its row pass)
                mixed = "[mix-order] " if "MixOrder" in type(node).__name__ else ""
                graph.kernels.append(Kernel(mixed + _fused_ops(node), int(node.get_read_write_buffers_sizes()),
                                            extern=False))
        graphs.append(graph)
        return original(self)

    scheduler.Scheduler.codegen = codegen
    return lambda: setattr(scheduler.Scheduler, "codegen", original)


def block_kernels(model_name: str, flavor: str, tokens: int, *, recompute_pointwise: bool = True,
                  rms_norm_backward: str = "autograd", float8: str = "none", float8_small_gemms: bool = False,
                  memory_budget: float = 1.0, code_dir: Path | None = None,
                  overrides: dict[str, Any] | None = None) -> list[GraphKernels]:
    """The forward and backward graphs' kernels of one compiled block of `model_name` / `flavor` at `tokens`.
    ``float8 = "tensorwise"``: the block's linears as torchao's float8 ones (`training.float8_recipe`; the CPU's
    `_scaled_mm` takes tensorwise scales only, which is why rowwise is not offered). ``memory_budget`` < 1: the
    partitioner's activation memory budget (`activation_checkpoint.mode = "budget"`)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    from posttrain.models.common.rms_norm import use_one_pass_backward
    from posttrain.models.registry import build_model
    from posttrain.parallelisms.activation_checkpoint import set_activation_memory_budget
    from posttrain.parallelisms.compile import partitioner_settings_kept, set_pointwise_recompute

    graphs: list[GraphKernels] = []
    phase = ["forward"]
    saved: list[int] = []

    def generate(name: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            phase[0] = name
            if name == "forward":
                saved.append(_saved_bytes(gm))
            try:
                compile_fx_inner(gm, example_inputs)
            except Exception:  # noqa: BLE001 - Triton cannot build the kernels for the CPU: they are recorded already
                pass
            return gm  # the graph runs in eager

        return compiler

    with _gpu_style_codegen(code_dir), partitioner_settings_kept():
        set_pointwise_recompute(recompute_pointwise)
        set_activation_memory_budget(memory_budget)
        undo = _recording_scheduler(graphs, phase)
        try:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = build_model(model_name, flavor, "cpu", n_layers=1, vocab_size=1024, **(overrides or {}))
            model = model.to(torch.bfloat16)
            if float8 != "none":
                from posttrain.parallelisms.float8 import convert_to_float8

                convert_to_float8(model, convert_small_gemms=float8_small_gemms, recipe=float8)
            if rms_norm_backward == "triton":
                use_one_pass_backward(model)
            backend = aot_autograd(fw_compiler=generate("forward"), bw_compiler=generate("backward"),
                                   partition_fn=min_cut_rematerialization_partition,
                                   decompositions=select_decomp_table())
            for block in model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers:
                block.compile(backend=backend, fullgraph=True)
            ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
            model(ids).float().pow(2).mean().backward()
        finally:
            undo()
            torch._dynamo.reset()
    forwards = [g for g in graphs if g.phase == "forward"]
    for graph, nbytes in zip(forwards, saved):
        graph.saved_bytes = nbytes
    return graphs


def _saved_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of a forward graph's outputs after the first (aot_autograd's forward returns the block's output, then
    the tensors saved for the backward); views of one storage counted once."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = [getattr(arg, "meta", {}).get("val") for arg in torch.utils._pytree.tree_leaves(output.args[0])[1:]]
    storages = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            storages[id(value.untyped_storage()) if not value._is_view() else id(value._base)] = \
                value.untyped_storage().nbytes()
    return sum(storages.values())


def render(graphs: list[GraphKernels], tb_s: float) -> str:
    lines = []
    total = 0
    for graph in graphs:
        ours = [k for k in graph.kernels if not k.extern]
        total += graph.inductor_bytes
        saved = "" if graph.saved_bytes is None else f"; saved for the backward: {graph.saved_bytes / 2**20:,.1f} MiB"
        lines.append(f"{graph.phase}: {len(ours)} inductor kernels, {graph.inductor_bytes / 1e6:,.1f} MB "
                     f"({graph.inductor_bytes / tb_s / 1e6:,.0f} us at {tb_s:g} TB/s){saved}")
        for kernel in graph.kernels:
            size = "extern" if kernel.extern else f"{kernel.nbytes / 1e6:10,.1f} MB"
            lines.append(f"  {size:>13}  {kernel.name[:120]}")
    lines.append(f"total in inductor kernels: {total / 1e6:,.1f} MB a block ({total / tb_s / 1e6:,.0f} us at "
                 f"{tb_s:g} TB/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3")
    p.add_argument("--flavor", default="1B")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--recompute-pointwise", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rms-norm-backward", default="autograd", choices=("autograd", "triton"))
    p.add_argument("--float8", default="none", choices=("none", "tensorwise"),
                   help="the block's linears as torchao's float8 ones (training.float8_recipe)")
    p.add_argument("--float8-small-gemms", action="store_true", help="training.float8_convert_small_gemms")
    p.add_argument("--memory-budget", type=float, default=1.0,
                   help="activation_checkpoint.memory_budget (the partitioner's budget mode) when below 1")
    p.add_argument("--tb-s", type=float, default=3.9, help="HBM bandwidth for the time column")
    p.add_argument("--code", type=Path, default=None, help="also write inductor's generated code under this folder")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.tb_s <= 0:
        raise SystemExit("--tokens must be >= 1 and --tb-s > 0")
    try:
        graphs = block_kernels(args.model, args.flavor, args.tokens, recompute_pointwise=args.recompute_pointwise,
                               rms_norm_backward=args.rms_norm_backward, float8=args.float8,
                               float8_small_gemms=args.float8_small_gemms, memory_budget=args.memory_budget,
                               code_dir=args.code)
    except Unsupported as err:
        raise SystemExit(f"gpu_kernels_on_cpu: {err}") from None
    except (KeyError, ValueError, ImportError) as err:
        raise SystemExit(f"gpu_kernels_on_cpu: {args.model} {args.flavor}: {err}") from None
    if not graphs:
        raise SystemExit("gpu_kernels_on_cpu: inductor generated no graph (nothing was compiled)")
    print(render(graphs, args.tb_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
