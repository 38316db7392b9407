"""model.sdpa_kernel = "fa4" on the device: FlashAttention-4's attention and gradients as close to fp32 as torch's
own kernel pick, and a model (eager and compiled blocks) training step equal to the same weights with torch's pick.
The checks run in a child process (fa4_checks.py): switching SDPA to FA4 lasts for the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models.common.flash_attention_4 import fa4_unavailable_reason

HERE = Path(__file__).resolve().parent
KERNEL_SLACK = 2.0  # FA4's error may be at most twice that of torch's own kernel on the same bf16 inputs (+1e-3)
LOSS_RTOL = 2e-3  # bf16 autocast: the two kernels round differently
GRAD_RTOL = 3e-2


def test_fa4_attention_and_training_step_match_torch_kernels(device: torch.device, tmp_path: Path,
                                                            record_property) -> None:
    if device.type != "cuda":
        pytest.skip("FA4 runs on CUDA only")
    reason = fa4_unavailable_reason()
    if reason is not None:
        pytest.skip(f"FA4 unavailable: {reason}")
    out = tmp_path / "fa4.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "fa4_checks.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    record_property("rel_err", json.dumps(result))
    assert result["active"] == "FA4"
    # 2 kernel shapes + 2 models x (eager, compiled) x 2 layers: each ran FA4's own forward and backward
    assert result["calls"]["forward"] >= 10 and result["calls"]["backward"] >= 10, result["calls"]
    for shape, errs in result["kernel"].items():
        for name, auto, fa4 in zip(("out", "dq", "dk", "dv"), errs["auto"], errs["fa4"]):
            assert fa4 <= KERNEL_SLACK * auto + 1e-3, (shape, name, fa4, auto)
    for head_dim, row in result["model"].items():
        for mode, r in row.items():
            assert r["loss"] == pytest.approx(r["loss_auto"], rel=LOSS_RTOL), (head_dim, mode, r)
            assert r["grad_rel"] < GRAD_RTOL, (head_dim, mode, r)
