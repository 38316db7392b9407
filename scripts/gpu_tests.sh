#!/usr/bin/env bash
# The GPU tier (tests/gpu/, marker `gpu`) in one go on a CUDA machine: installs what the machine lacks from
# carried wheels, runs the tier (in parallel workers when pytest-xdist is there), and writes under OUT_DIR
#   junit.xml    every test with its outcome, time and recorded numbers (rel_err, trend)
#   pytest.log   pytest's output
#   summary.txt  date, commit, GPU, torch, passed / failed / skipped, each failure and skip, the recorded numbers
#
#   bash scripts/gpu_tests.sh OUT_DIR [extra pytest args, e.g. -k parity]
#
# Wheels: every .whl in $GPU_TESTS_WHEELS (default .whl/, filled by ../shared/tools/device_wheels.sh) is
# installed into a temporary folder put on PYTHONPATH (the GPU image lacks torchdata, and Ray for GRPO).
# Knobs: PYTHON, GPU_TESTS_WORKERS (default 8; 0 = no xdist), GPU_TESTS_TIMEOUT (per test, default 420 s),
# GPU_TESTS_DEADLINE (the whole pytest run, default 500 s: the tier fits one 10-minute device call),
# POSTTRAIN_COMMIT (recorded when there is no .git), POSTTRAIN_GPU_TESTS_DEVICE=cpu (a dry run on the CPU).
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_tests.sh OUT_DIR [pytest args...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Inductor's default pool of compile processes (one per core) in every parallel worker: on the first H200 run,
# with the default, ten workers died at once ("node down", most likely memory), so keep the pools small
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
start=$(date +%s)

wheels=("${GPU_TESTS_WHEELS:-.whl}"/*.whl)
if [ -e "${wheels[0]}" ]; then
  site=$(mktemp -d /tmp/posttrain_gpu_site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { echo "error: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#wheels[@]} wheels into $site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

args=(tests/gpu -m gpu -p no:cacheprovider -q -rfEsx --junitxml "$OUT/junit.xml" -o junit_family=xunit1
      --durations=15)
workers=${GPU_TESTS_WORKERS:-8}
if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "$workers" --dist load); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout "${GPU_TESTS_TIMEOUT:-420}"); fi
# SIGINT at the deadline: pytest stops, still writing the junit XML of what ran
timeout -s INT -k 30 "${GPU_TESTS_DEADLINE:-500}" "$PY" -m pytest "${args[@]}" "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

commit=${POSTTRAIN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
"$PY" - "$OUT" "$commit" "$(( $(date +%s) - start ))" "$status" <<'PY' | tee "$OUT/summary.txt"
import sys, time, xml.etree.ElementTree as ET
out, commit, seconds, status = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
counts, lines, numbers = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}, [], []
try:
    cases = ET.parse(f"{out}/junit.xml").getroot().iter("testcase")
except (OSError, ET.ParseError) as err:
    cases = []
    lines.append(f"no junit XML: {err}")
for case in cases:
    name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
    kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
    if kind == "skipped" and "xfail" in (next((c.get("type", "") for c in case if c.tag == "skipped"), "")):
        kind = "xfailed"
    kind = {"failure": "failed", "error": "failed"}.get(kind, kind)
    counts[kind] += 1
    if kind != "passed":
        lines.append(f"{kind.upper():8} {name} ({float(case.get('time', 0)):.0f} s): {message.splitlines()[0][:240] if message else ''}")
    for prop in case.iter("property"):
        numbers.append(f"  {name}: {prop.get('name')} {prop.get('value')}")
print(f"GPU tier {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {gpu}, torch {torch.__version__}")
print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, {counts['xfailed']} xfailed "
      f"in {seconds} s (pytest exit {status})")
print("\n".join(lines))
print("recorded numbers:")
print("\n".join(numbers))
PY
exit "$status"
