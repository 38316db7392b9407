"""The GPU tier's summary (scripts/gpu_tests_summary.py): a test the deadline stopped before is counted and
named, and pytest's own interrupt error is not counted as a failing test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_tests_summary.py"

# junit as pytest writes it when the deadline's SIGINT reaches xdist's controller mid-run
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="0" skipped="1" tests="4" time="127.0">
<testcase classname="tests.gpu.test_cuda_lora" name="test_merged_export_equals_the_peft_adapter[qwen3]" time="3.1">
  <properties><property name="rel_err" value="merged 4.55e-07"/></properties></testcase>
<testcase classname="tests.gpu.test_cuda_lora" name="test_merged_export_equals_the_peft_adapter[gpt_oss]" time="2.0"/>
<testcase classname="tests.gpu.test_cuda_native_engine" name="test_greedy_equals_transformers_generate_on_smollm2" time="0">
  <skipped type="pytest.skip" message="the `gguf` library is not installed"/></testcase>
<testcase classname="pytest" name="internal" time="0"><error message="internal error">RuntimeError: release unlocked lock</error></testcase>
</testsuite></testsuites>
"""

COLLECTED = """tests/gpu/test_cuda_lora.py::test_merged_export_equals_the_peft_adapter[qwen3]
tests/gpu/test_cuda_lora.py::test_merged_export_equals_the_peft_adapter[gpt_oss]
tests/gpu/test_cuda_native_engine.py::test_greedy_equals_transformers_generate_on_smollm2
tests/gpu/test_cuda_debug_configs.py::test_debug_grpo

4 tests collected in 2.10s
"""


def run_summary(out: Path, parallel: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "summary", str(out), "abc1234", "130", parallel, "none"],
                          capture_output=True, text=True, timeout=120)


def test_tests_the_deadline_stopped_before_are_named_and_fail_the_run(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "collected.txt").write_text(COLLECTED)
    proc = run_summary(tmp_path, "124")
    counts = proc.stdout.splitlines()[1]
    assert counts.startswith("2 passed, 0 failed, 1 skipped, 0 xfailed, 1 NOT RUN in 130 s"), proc.stdout
    assert "NOT RUN  test_cuda_debug_configs::test_debug_grpo" in proc.stdout
    assert "HARNESS  pytest's own error, not a test (exit 124" in proc.stdout
    assert "test_cuda_lora::test_merged_export_equals_the_peft_adapter[qwen3]: rel_err merged 4.55e-07" in proc.stdout
    assert proc.returncode == 124


def test_a_complete_run_passes_and_a_missing_outcome_alone_still_fails(tmp_path: Path) -> None:
    complete = JUNIT.replace(
        '<testcase classname="pytest" name="internal" time="0"><error message="internal error">RuntimeError: '
        'release unlocked lock</error></testcase>',
        '<testcase classname="tests.gpu.test_cuda_debug_configs" name="test_debug_grpo" time="40.0"/>',
    )
    (tmp_path / "junit.xml").write_text(complete)
    (tmp_path / "collected.txt").write_text(COLLECTED)
    proc = run_summary(tmp_path, "0")
    assert proc.returncode == 0 and "3 passed, 0 failed, 1 skipped, 0 xfailed in 130 s" in proc.stdout, proc.stdout

    (tmp_path / "collected.txt").write_text(COLLECTED.replace("4 tests", "tests/gpu/test_cuda_lora.py::test_new\n4 tests"))
    proc = run_summary(tmp_path, "0")
    assert proc.returncode == 1 and "1 NOT RUN" in proc.stdout, proc.stdout


def test_outcomes_missing_from_the_xml_are_read_from_the_verbose_log(tmp_path: Path) -> None:
    """Run 9: every test ran, a worker did not exit at teardown, the deadline killed pytest before it wrote junit.xml."""
    (tmp_path / "collected.txt").write_text(COLLECTED)
    (tmp_path / "pytest.log").write_text(
        "[gw0] [ 25%] PASSED tests/gpu/test_cuda_lora.py::test_merged_export_equals_the_peft_adapter[qwen3]\n"
        "\x1b[31m[gw1] [ 50%] FAILED tests/gpu/test_cuda_lora.py::test_merged_export_equals_the_peft_adapter[gpt_oss]"
        "\x1b[0m \n"  # colour on, as with PY_COLORS=1
        "[gw0] SKIPPED tests/gpu/test_cuda_native_engine.py::test_greedy_equals_transformers_generate_on_smollm2\n"
        "RuntimeError: release unlocked lock\n")
    proc = run_summary(tmp_path, "124")
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("1 passed, 1 failed, 1 skipped, 0 xfailed, 1 NOT RUN in 130 s"), proc.stdout
    assert lines[2].startswith("3 outcomes read from pytest.log"), proc.stdout
    assert "NOT RUN  test_cuda_debug_configs::test_debug_grpo" in proc.stdout
    assert proc.returncode == 124
