"""The GPU tier (marker ``gpu``): what CI's CPU machines cannot prove, run on one CUDA device.

Every test under tests/gpu/ is marked ``gpu`` and gets the ``device`` fixture. Without CUDA the tier skips,
saying why; ``POSTTRAIN_GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU instead, to develop them before
a GPU run (tests of features the CPU lacks, such as FlexAttention's backward, skip there with that reason).
``scripts/gpu_tests.sh`` runs the tier on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _gpu_tier import HERE, isolate_compile_caches, load_verifier, tier_device

isolate_compile_caches()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device, reason = tier_device()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if device is None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    name, reason = tier_device()
    if name is None:
        pytest.skip(reason)
    return torch.device(name)


@pytest.fixture(scope="session")
def random_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random tiny HF checkpoint per family (verify_hf_parity's awkward configs), keyed by model_type."""
    verify = load_verifier()
    root = tmp_path_factory.mktemp("random_hf")
    return {t: verify.make_random_hf_model(t, root / t) for t in verify.RANDOM_CONFIG_BUILDERS}
