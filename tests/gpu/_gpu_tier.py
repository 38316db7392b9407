"""Helpers the GPU tier's tests share (conftest.py holds the fixtures)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEVICE_VAR = "POSTTRAIN_GPU_TESTS_DEVICE"


def tier_device() -> tuple[str | None, str]:
    """The device the tier runs on (None: skip) and the reason when it skips."""
    choice = os.environ.get(DEVICE_VAR, "cuda")
    if choice not in ("cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_VAR}={choice!r}: use 'cuda' (the default) or 'cpu' (a dry run)")
    if choice == "cpu":
        return "cpu", ""
    if not torch.cuda.is_available():
        return None, f"GPU tier: no CUDA device visible (set {DEVICE_VAR}=cpu to dry-run it on the CPU)"
    return "cuda", ""


def isolate_compile_caches() -> dict[str, str]:
    """Give this pytest-xdist worker its own inductor and Triton caches (a no-op outside xdist).

    Workers that compile at the same time write one shared cache otherwise, and concurrent writes there are a
    known source of crashes (a precaution: the "worker crashed" waves of the 2026-12-02 H200 runs came from the
    end-of-session sweep in tests/conftest.py). Called when the tier's conftest is imported, before anything
    compiles; subprocesses the worker starts inherit the folders.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return {}
    chosen = {}
    for var, default in (("TORCHINDUCTOR_CACHE_DIR", "torchinductor"), ("TRITON_CACHE_DIR", "triton")):
        base = os.environ.get(var) or os.path.join(tempfile.gettempdir(), f"posttrain_gpu_tier_{default}")
        chosen[var] = os.environ[var] = os.path.join(base, worker)
    return chosen


def load_verifier():
    """scripts/verify_hf_parity.py as a module: the random tiny HF configs and the logit comparison."""
    if "verify_hf_parity" in sys.modules:
        return sys.modules["verify_hf_parity"]
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
