"""scripts/gpu_kernels_on_cpu.py: inductor's Triton kernels for a compiled block, generated on the CPU with a GPU's
mix-order reductions, and the bytes each moves; the patches to inductor undone afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed: inductor's Triton code generation needs it")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_kernels_on_cpu as gpu_kernels  # noqa: E402


def _by_phase(graphs):
    return {g.phase: g for g in graphs}


def test_a_blocks_kernels_and_what_pointwise_recompute_and_the_norm_op_change() -> None:
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils

    hash_before, backend_before = triton_utils.triton_hash_with_backend, inductor_config.cpu_backend
    recomputed = _by_phase(gpu_kernels.block_kernels("llama3", "debug", 512))
    assert set(recomputed) == {"forward", "backward"}
    for graph in recomputed.values():
        assert graph.inductor_bytes > 0
        assert any(k.extern and "mm" in k.name for k in graph.kernels)  # the projections are cuBLAS's
    # the SwiGLU's backward kernel writes the product back (for w2's weight gradient) when it is recomputed
    saved = _by_phase(gpu_kernels.block_kernels("llama3", "debug", 512, recompute_pointwise=False))
    assert saved["backward"].inductor_bytes < recomputed["backward"].inductor_bytes
    assert saved["forward"].inductor_bytes >= recomputed["forward"].inductor_bytes
    # ... and the forward keeps more for the backward: at least the SwiGLU product, [512, ffn_dim] bf16
    ffn_dim = 256
    assert saved["forward"].saved_bytes >= recomputed["forward"].saved_bytes + 512 * ffn_dim * 2
    assert recomputed["backward"].saved_bytes is None
    with_op = _by_phase(gpu_kernels.block_kernels("llama3", "debug", 512, rms_norm_backward="triton"))
    assert sum("rms_norm_backward" in k.name for k in with_op["backward"].kernels if k.extern) == 2
    # inductor is as it was
    assert triton_utils.triton_hash_with_backend is hash_before and inductor_config.cpu_backend == backend_before
    text = gpu_kernels.render(list(recomputed.values()), tb_s=3.9)
    assert "forward:" in text and "backward:" in text and "total in inductor kernels" in text


def test_float8_tensorwise_adds_the_casts_kernels() -> None:
    pytest.importorskip("torchao", reason="torchao is not installed (the float8 extra)")
    bf16 = _by_phase(gpu_kernels.block_kernels("llama3", "debug", 512))
    f8 = _by_phase(gpu_kernels.block_kernels("llama3", "debug", 512, float8="tensorwise", float8_small_gemms=True))
    assert any(k.extern and "_scaled_mm" in k.name for k in f8["forward"].kernels)
    # every linear's input and weight is scaled (an amax) and cast: more kernels, more bytes, in both graphs
    for phase in ("forward", "backward"):
        assert f8[phase].inductor_bytes > bf16[phase].inductor_bytes
        assert sum(not k.extern for k in f8[phase].kernels) > sum(not k.extern for k in bf16[phase].kernels)


def test_mix_order_reductions_as_on_a_gpu_above_inductors_size_threshold() -> None:
    # 8,192 rows x 640 columns: the smallest norm inductor fuses this way (>= 5 Mi elements, rows >= 2 x columns)
    graphs = gpu_kernels.block_kernels("llama3", "debug", 8192,
                                       overrides={"dim": 640, "n_heads": 10, "n_kv_heads": 2, "ffn_dim": 256})
    backward = _by_phase(graphs)["backward"]
    assert any(k.name.startswith("[mix-order]") for k in backward.kernels), [k.name for k in backward.kernels]


def test_the_command_line_refuses_in_one_line() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_kernels_on_cpu.py"), "--tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--tokens must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
