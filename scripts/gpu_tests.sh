#!/usr/bin/env bash
# The GPU tier (tests/gpu/, marker `gpu`) in one go on a CUDA machine: installs what the machine lacks from
# carried wheels, runs the tier (in parallel workers when pytest-xdist is there), and writes under OUT_DIR
#   junit.xml         every test with its outcome, time and recorded numbers (rel_err, trend)
#   junit_serial.xml  the serial re-run of tests whose xdist worker crashed (only when there were some)
#   pytest.log        pytest's output (both passes)
#   summary.txt       date, commit, GPU, torch, passed / failed / skipped (each test's final outcome: a test
#                     re-run serially counts once, with the re-run's outcome, and is marked so), each failure
#                     and skip, the recorded numbers
#
#   collected.txt     the node ids collected (tests with no outcome in the XML are reported as NOT RUN)
#
#   bash scripts/gpu_tests.sh OUT_DIR [extra pytest args, e.g. -k parity]
#   bash scripts/gpu_tests.sh OUT_DIR tests/gpu/test_x.py::test_y ...   (node ids or paths replace tests/gpu)
#
# Two passes inside GPU_TESTS_DEADLINE: the tier in parallel xdist workers (until the deadline less
# GPU_TESTS_SERIAL_RESERVE), then the tests whose worker crashed ("worker 'gwN' crashed while running ...")
# again in one serial pytest run, in whatever time is left (skipped, and said so, when under 30 s are left).
# Wheels: every .whl in $GPU_TESTS_WHEELS (default .whl/, filled by ../shared/tools/device_wheels.sh) is
# installed into a temporary folder put on PYTHONPATH (the GPU image lacks torchdata, and Ray for GRPO).
# Knobs: PYTHON, GPU_TESTS_WORKERS (default 8; 0 = no xdist), GPU_TESTS_TIMEOUT (per test, default 420 s),
# GPU_TESTS_DEADLINE (both passes, default 500 s: the tier fits one 10-minute device call),
# GPU_TESTS_SERIAL_RESERVE (seconds kept from the parallel pass for the serial re-run, default 90),
# POSTTRAIN_COMMIT (recorded when there is no .git), POSTTRAIN_GPU_TESTS_DEVICE=cpu (a dry run on the CPU).
# Each xdist worker compiles into its own inductor / Triton cache (tests/gpu/conftest.py).
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

common=(-m gpu -p no:cacheprovider -rfEsx -o junit_family=xunit1 --durations=15)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then common+=(--timeout "${GPU_TESTS_TIMEOUT:-420}"); fi
deadline=${GPU_TESTS_DEADLINE:-500}
parallel=()
workers=${GPU_TESTS_WORKERS:-8}
if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "$workers" --dist load); fi
reserve=0
if [ ${#parallel[@]} -gt 0 ]; then reserve=${GPU_TESTS_SERIAL_RESERVE:-90}; fi
targets=(tests/gpu)
if [ $# -gt 0 ] && [[ "$1" == tests/* ]]; then targets=(); fi
"$PY" -m pytest "${targets[@]}" -m gpu -p no:cacheprovider --collect-only -q "$@" > "$OUT/collected.txt" 2>&1
# SIGINT at the deadline: pytest stops, still writing the junit XML of what ran. -v: each outcome is also in the log
# as it happens, for when pytest never gets to write the XML (a worker that did not exit at teardown, run 9)
timeout -s INT -k 30 "$(( deadline - reserve ))" "$PY" -m pytest "${targets[@]}" "${common[@]}" "${parallel[@]}" -v \
  --junitxml "$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

rm -f "$OUT/junit_serial.xml" "$OUT/serial_tests.txt"
serial_status=none
if [ ${#parallel[@]} -gt 0 ]; then
  "$PY" scripts/gpu_tests_summary.py crashed "$OUT/junit.xml" > "$OUT/serial_tests.txt"
  left=$(( deadline - ($(date +%s) - start) ))
  if [ -s "$OUT/serial_tests.txt" ] && [ "$left" -ge 30 ]; then
    echo "== re-running $(wc -l < "$OUT/serial_tests.txt") tests whose worker crashed, serially, within ${left} s" \
      | tee -a "$OUT/pytest.log"
    mapfile -t crashed < "$OUT/serial_tests.txt"
    # -v: the log names each test before it runs, so a crash here still says which test it was
    timeout -s INT -k 30 "$left" "$PY" -m pytest "${crashed[@]}" "${common[@]}" -v --junitxml "$OUT/junit_serial.xml" \
      2>&1 | tee -a "$OUT/pytest.log"
    serial_status=${PIPESTATUS[0]}
  elif [ -s "$OUT/serial_tests.txt" ]; then
    echo "== not re-running the tests whose worker crashed: ${left} s left before the deadline" | tee -a "$OUT/pytest.log"
  fi
fi

commit=${POSTTRAIN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# exit status: 0 when every test's final outcome is a pass, skip or xfail and neither pass was cut short
"$PY" scripts/gpu_tests_summary.py summary "$OUT" "$commit" "$(( $(date +%s) - start ))" "$status" "$serial_status" \
  | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
