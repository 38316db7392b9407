"""``training.deterministic``: the same config, data and checkpoint give bit-identical steps on one GPU.

What it switches on, process-wide (each rank's process; set before the first CUDA matmul):
- ``torch.use_deterministic_algorithms(True)``: ops with a nondeterministic GPU kernel take their deterministic
  one (SDPA's memory-efficient backward gives up split-key atomics, ``index_add_`` / ``scatter_add_`` sort
  first) and ops that have none raise instead of varying silently;
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set): cuBLAS's deterministic workspace, which the line above
  requires on CUDA;
- cuDNN deterministic, no cuDNN benchmarking;
- inductor's deterministic mode (no on-device benchmarking to pick kernels) where this torch has it;
- the fused losses' per-chunk math runs eagerly: compiled once with dynamic shapes, its kernels are generated
  for the size hints of the first chunk a process sees, which differ between a run and its resume; eager
  kernels depend only on each call's shapes.

Slower (about how much depends on the model; attention's backward loses parallelism), so off by default.
"""

from __future__ import annotations

import os

import torch

from posttrain.losses import logit_math

CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_mode() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):  # torch >= 2.8
        inductor_config.deterministic = True
    logit_math.compile_on_cuda = False


__all__ = ["CUBLAS_WORKSPACE", "use_deterministic_mode"]
