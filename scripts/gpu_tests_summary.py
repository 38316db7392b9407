#!/usr/bin/env python
"""The GPU tier's bookkeeping for scripts/gpu_tests.sh, from pytest's junit XML files.

    python scripts/gpu_tests_summary.py crashed JUNIT_XML
        the node ids of tests whose xdist worker crashed, one a line (the serial re-run's arguments)
    python scripts/gpu_tests_summary.py summary OUT_DIR COMMIT SECONDS PARALLEL_STATUS SERIAL_STATUS
        summary.txt's text from OUT_DIR/junit.xml and, when there, OUT_DIR/junit_serial.xml: each test counted
        once with its final outcome (a serially re-run test's outcome replaces its crash, and is marked so;
        a test missing from the XML takes its outcome from OUT_DIR/pytest.log's verbose lines, said so);
        the tests in OUT_DIR/collected.txt (pytest --collect-only -q) with no outcome are counted and named as
        not run (the deadline stopped the run before them); exits 0 when no final outcome is a failure, every
        collected test has one and neither pytest run was cut short, else 1 (or the status of the run that
        ended abnormally, e.g. 124 when the deadline interrupted it)
"""

from __future__ import annotations

import re
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CRASH_MARK = "crashed while running"


@dataclass
class Outcome:
    kind: str  # passed, failed, skipped, xfailed
    seconds: float
    message: str
    numbers: list[str] = field(default_factory=list)


def node_id(classname: str, name: str) -> str:
    """pytest's node id from a junit testcase: the longest dotted prefix of classname that is a .py file."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        if (REPO / Path(*parts[:cut])).with_suffix(".py").is_file():
            return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
    return f"{classname.replace('.', '/')}.py::{name}"


def read_outcomes(path: Path) -> tuple[dict[str, Outcome], str | None]:
    """Outcomes by node id, in file order, and an error text when the file is missing or broken."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        return {}, f"no junit XML at {path}: {err}"
    outcomes = {}
    for case in root.iter("testcase"):
        marks = [c for c in case if c.tag in ("failure", "error", "skipped")]
        kind = {"failure": "failed", "error": "failed"}.get(marks[0].tag, marks[0].tag) if marks else "passed"
        if kind == "skipped" and "xfail" in marks[0].get("type", ""):
            kind = "xfailed"
        outcome = Outcome(kind, float(case.get("time", 0) or 0), marks[0].get("message", "") if marks else "")
        outcome.numbers = [f"{p.get('name')} {p.get('value')}" for p in case.iter("property")]
        outcomes[node_id(case.get("classname", ""), case.get("name", ""))] = outcome
    return outcomes, None


# `pytest -v` under xdist: "[gw3] [ 12%] PASSED tests/gpu/test_x.py::test_y[a b] " (no "[ 12%]" without progress)
LOG_LINE = re.compile(r"^\[gw\d+\](?: \[[^\]]*\])? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S.*?::.+?)\s*$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_KINDS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped", "XFAIL": "xfailed",
             "XPASS": "passed"}


def read_log_outcomes(path: Path) -> dict[str, Outcome]:
    """Outcomes from the parallel pass's verbose log: what ran when pytest was stopped before writing its junit XML
    (a worker that did not exit at teardown, then the deadline); a test's last line counts."""
    if not path.is_file():
        return {}
    outcomes = {}
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(ANSI.sub("", line))
        if m:
            outcomes[m.group(2)] = Outcome(LOG_KINDS[m.group(1)], 0.0, "outcome read from pytest.log (no junit entry)")
    return outcomes


def read_collected(path: Path) -> list[str]:
    """Node ids from `pytest --collect-only -q` output (its summary line and blank lines dropped)."""
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if "::" in line and not line.startswith(" ")]


def is_harness_error(name: str) -> bool:
    """junit's stand-in for pytest's own INTERNALERROR (xdist's controller, e.g. on the deadline's SIGINT)."""
    return name.startswith("pytest.py::internal")


def crashed(outcomes: dict[str, Outcome]) -> list[str]:
    return [n for n, o in outcomes.items() if o.kind == "failed" and CRASH_MARK in o.message]


def final_status(outcomes: dict[str, Outcome], parallel: str, serial: str) -> int:
    for status in (parallel, serial):
        if status not in ("0", "1", "5", "none"):  # 5: nothing collected (a -k that matches no test)
            return int(status)
    return 1 if any(o.kind == "failed" for o in outcomes.values()) else 0


def summary(out: Path, commit: str, seconds: str, parallel: str, serial: str) -> int:
    import torch

    outcomes, error = read_outcomes(out / "junit.xml")
    rerun = {}
    if (out / "junit_serial.xml").is_file():
        rerun, serial_error = read_outcomes(out / "junit_serial.xml")
        error = error or serial_error
    from_log = {n: o for n, o in read_log_outcomes(out / "pytest.log").items() if n not in outcomes}
    outcomes.update(from_log)
    outcomes.update(rerun)
    harness_errors = {n: outcomes.pop(n) for n in [n for n in outcomes if is_harness_error(n)]}
    not_run = [n for n in read_collected(out / "collected.txt") if n not in outcomes]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "xfailed")}
    lines = [error] if error else []
    for name, o in harness_errors.items():
        first = o.message.splitlines()[0][:240] if o.message else ""
        lines.append(f"HARNESS  pytest's own error, not a test (exit {parallel}; 124 = the deadline's interrupt): {first}")
    for name in not_run:
        lines.append(f"NOT RUN  {name.split('/')[-1].replace('.py::', '::')}: no outcome (collected; the run stopped before it)")
    for name, o in outcomes.items():
        counts[o.kind] += 1
        short = name.split("/")[-1].replace(".py::", "::")
        tag = " [re-run serially]" if name in rerun else ""
        if o.kind != "passed":
            first = o.message.splitlines()[0][:240] if o.message else ""
            lines.append(f"{o.kind.upper():8} {short}{tag} ({o.seconds:.0f} s): {first}")
    still_crashed = crashed(outcomes)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"GPU tier {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {gpu}, torch {torch.__version__}")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, {counts['xfailed']} xfailed"
          f"{f', {len(not_run)} NOT RUN' if not_run else ''} in {seconds} s (pytest exit: parallel {parallel}, serial re-run {serial})")
    if from_log:
        print(f"{len(from_log)} outcomes read from pytest.log: pytest was stopped before it wrote them to junit.xml "
              "(the run or its workers' teardown outlived the deadline); no times or recorded numbers for them")
    if rerun:
        passed = sum(o.kind == "passed" for o in rerun.values())
        print(f"re-run serially after their xdist worker crashed: {len(rerun)} ({passed} passed)")
    if serial not in ("0", "1", "5", "none"):
        print(f"the serial re-run ended abnormally (exit {serial}; 2 = the deadline); tests without its result keep "
              "their crash outcome (pytest.log names the test it was running)")
    if still_crashed:
        print(f"worker crashed and no serial result: {len(still_crashed)}")
    print("\n".join(lines))
    print("recorded numbers:")
    for name, o in outcomes.items():
        short = name.split("/")[-1].replace(".py::", "::")
        for number in o.numbers:
            print(f"  {short}: {number}")
    status = final_status(outcomes, parallel, serial)
    return status or (1 if not_run or harness_errors else 0)


def main(argv: list[str]) -> int:
    if argv[:1] == ["crashed"] and len(argv) == 2:
        outcomes, _ = read_outcomes(Path(argv[1]))
        for name in crashed(outcomes):
            print(name)
        return 0
    if argv[:1] == ["summary"] and len(argv) == 6:
        return summary(Path(argv[1]), *argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
