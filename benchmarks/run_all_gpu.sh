#!/usr/bin/env bash
# All three GPU benchmarks on one GPU (sized for one H200), in a fixed order, within about 9 minutes:
#   1. bench_sft          Qwen3-1.7B, seq 4096 x batch 2: posttrain and HF peers            (hard cap 350 s)
#   2. bench_packing      Qwen3-0.6B, seq 4096 x batch 4: padding vs best-fit packing          (hard cap 100 s)
#   3. bench_loss_memory  16,384 tokens, hidden 2048, vocab 151,936 and 262,144                (hard cap 100 s)
# Each writes <OUT>/<name>.log and <OUT>/<name>.json; the tables are printed together at the end.
#
# usage: bash benchmarks/run_all_gpu.sh [OUT]      (OUT defaults to $OUT, else ./bench_out)
#        BENCH_SMOKE=1 bash benchmarks/run_all_gpu.sh /tmp/smoke   (tiny CPU shapes, to test the script)
# Liger: if `import liger_kernel` fails and a wheel lies in .whl/ (repo root), it is unpacked into a temp
# folder on PYTHONPATH (no network, no dependencies); without it the Liger peers are reported as skipped.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/bench_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "triton", "torchdata", "liger_kernel"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "not importable:", type(err).__name__)
EOF
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
} > "$OUT_DIR/env.log"
cat "$OUT_DIR/env.log"

if ! "$PY" -c "import liger_kernel" > /dev/null 2>&1; then
  WHL="$(ls "$ROOT"/.whl/liger_kernel*.whl 2>/dev/null | head -n 1)"
  if [ -n "$WHL" ]; then
    SITE="$(mktemp -d /tmp/liger_site.XXXXXX)"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHL" > "$OUT_DIR/liger_install.log" 2>&1; then
      "$PY" -m zipfile -e "$WHL" "$SITE" >> "$OUT_DIR/liger_install.log" 2>&1
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
fi
"$PY" -c "import liger_kernel, importlib.metadata as m; print('liger_kernel', m.version('liger_kernel'))" 2>/dev/null \
  || echo "liger_kernel: not available (Liger peers will be skipped)"

run() {  # run NAME HARD_LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo ">>> $name (hard limit ${limit}s): $PY $*"
  timeout --kill-after=10 "$limit" "$PY" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "<<< $name exit $rc after $(( $(date +%s) - t0 ))s$([ $rc -eq 124 ] && echo ' (timed out)')"
  grep -E '^\[' "$OUT_DIR/$name.log" | tail -n 20
}

if [ "${BENCH_SMOKE:-0}" = "1" ]; then  # tiny CPU shapes: checks this script end to end, numbers mean nothing
  SFT_ARGS=(--device cpu --flavor debug --seq-len 256 --batch 2 --steps 2 --warmup 1
            --posttrain-variants eager+sdpa --peers hf_eager,hf_liger)
  PACK_ARGS=(--device cpu --flavor debug --seq-len 512 --batch 2 --steps 2 --warmup 1 --median-len 32 --max-len 512)
  LOSS_ARGS=(--device cpu --tokens 512 --hidden 64 --vocabs 1000,2048 --chunk-sizes 128,256
             --pad-vocabs 1000 --iters 2 --warmup 1)
else
  SFT_ARGS=(--model qwen3 --flavor 1.7B --seq-len 4096 --batch 2 --steps 20 --warmup 5
            --posttrain-variants compile+flex,eager+flex,eager+sdpa --peers hf_eager,hf_compile,hf_liger)
  PACK_ARGS=(--model qwen3 --flavor 0.6B --seq-len 4096 --batch 4 --steps 10 --warmup 3 --modes padding,best_fit)
  LOSS_ARGS=(--tokens 16384 --hidden 2048 --vocabs 151936,262144 --chunk-sizes 1024,2048,4096,8192
             --iters 5 --warmup 2)
fi

run sft_qwen3_1.7B 350 benchmarks/bench_sft.py "${SFT_ARGS[@]}" \
  --time-budget-s 320 --out "$OUT_DIR/sft_qwen3_1.7B.json"

run packing_qwen3_0.6B 100 benchmarks/bench_packing.py "${PACK_ARGS[@]}" \
  --time-budget-s 80 --out "$OUT_DIR/packing_qwen3_0.6B.json"

run loss_memory 100 benchmarks/bench_loss_memory.py "${LOSS_ARGS[@]}" \
  --time-budget-s 75 --out "$OUT_DIR/loss_memory.json"

echo
echo "######## results (all runs took $(( $(date +%s) - T_START ))s; logs and JSON in $OUT_DIR) ########"
for name in sft_qwen3_1.7B packing_qwen3_0.6B loss_memory; do
  log="$OUT_DIR/$name.log"
  echo
  if grep -q '^=== RESULTS ===' "$log" 2>/dev/null; then
    sed -n '/^=== RESULTS ===/,$p' "$log"
  else
    echo "=== $name: no results table (cut short or crashed); partial JSON: $OUT_DIR/$name.json; log tail:"
    tail -n 25 "$log" 2>/dev/null
  fi
done
