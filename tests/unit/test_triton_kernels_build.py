"""The project's Triton kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's own compiler and
ptxas (shipped in the triton wheel) build each kernel as it is launched, and cuobjdump reads the cubin's resource
usage. Checked: every kernel builds (the interpreter tests never compile), none spills to local memory, and the
RMSNorm backward's launch shapes keep at least 16 warps resident per SM (its registers, not guessed: measured here).
Speed is the GPU's to say (BENCHMARKS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed: the sm_90 build check needs it")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:  # an older / newer Triton without these entry points
    pytest.skip(f"this Triton ({triton.__version__}) has no ASTSource / GPUTarget: {err}", allow_module_level=True)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not os.path.exists(os.path.join(_BIN, "cuobjdump")):
    pytest.skip(f"this Triton ({triton.__version__}) ships no NVIDIA toolchain under {_BIN}", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536


def resource_usage(kernel, signature: dict[str, str], constexprs: dict[str, object], num_warps: int) -> dict[str, int]:
    """REG / LOCAL / SHARED of `kernel`'s sm_90 cubin for one specialisation."""
    names = kernel.arg_names
    full = {name: signature.get(name, "constexpr") for name in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", line)}


def resident_warps(registers: int, num_warps: int) -> int:
    per_thread = -(-registers // 8) * 8  # allocated in units of 8 registers a thread
    programs = REGISTERS_PER_SM // (per_thread * 32 * num_warps)
    return programs * num_warps


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("n_rows, n_cols", [
    (8192, 2048),  # Llama-3.2-1B / Qwen3-1.7B block norms, 8,192 tokens
    (8192, 2560),  # Qwen3-4B
    (8192, 4096),  # Llama-3.1-8B
    (8192, 5120),  # 14B-class
    (8192 * 40, 128),  # per-head q / k norms
    (300, 128),  # fewer rows than programs
])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_backward_builds_without_spills_and_keeps_16_warps_resident(n_rows: int, n_cols: int,
                                                                               residual: bool) -> None:
    from posttrain.models.common import rms_norm_backward as norm

    _, _, block, rows, num_warps = norm.launch_shape(n_rows, n_cols, max_programs=4 * 132)
    signature = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32",
                 "residual_grad_ptr": "*bf16", "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32", "n_rows": "i32",
                 "n_cols": "i32", "rows_per_program": "i32"}
    usage = resource_usage(norm._rms_norm_backward_rows, signature,
                           {"ZERO_CENTERED": False, "HAS_RESIDUAL": residual, "BLOCK": block, "ROWS": rows},
                           num_warps)
    assert usage["LOCAL"] == 0, usage
    assert resident_warps(usage["REG"], num_warps) >= 16, (block, rows, num_warps, usage)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_other_kernels_build_for_hopper_without_spills() -> None:
    from posttrain import triton_adamw
    from posttrain.losses import ce_grad_kernel

    tables = {"tensor_of_block": "*i32", "first_block": "*i32", "numels": "*i64"}
    builds = {
        "ce_grad": (ce_grad_kernel._ce_grad_kernel,
                    {"logits_ptr": "*bf16", "row_stride": "i32", "targets_ptr": "*i64", "rows_ptr": "*fp32",
                     "n_rows": "i32", "n_cols": "i32"},
                    {"BLOCK": ce_grad_kernel._BLOCK, "BACKWARD_SECOND_PASS": False}),
        "adamw": (triton_adamw._adamw_blocks,
                  {**tables, "param_addrs": "*i64", "grad_addrs": "*i64", "avg_addrs": "*i64",
                   "avg_sq_addrs": "*i64", "step_addrs": "*i64", "grad_scale": "*fp32", "found_inf": "*fp32",
                   "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32",
                   "eps": "fp32", "weight_decay": "fp32", "like": "*bf16"},
                  {"HAS_GRAD_SCALE": False, "HAS_FOUND_INF": True, "BLOCK": triton_adamw._BLOCK}),
        "grad_squares": (triton_adamw._grad_squares_blocks,
                         {**tables, "grad_addrs": "*i64", "partials": "*fp32", "like": "*bf16"},
                         {"BLOCK": triton_adamw._BLOCK}),
    }
    for name, (kernel, signature, constexprs) in builds.items():
        usage = resource_usage(kernel, signature, constexprs, num_warps=8)
        assert usage["LOCAL"] == 0, (name, usage)
