#!/usr/bin/env bash
# The real-model GRPO run on one GPU in one device call: SmolLM2-135M-Instruct (base) on reasoning-gym arithmetic,
# held-out accuracy before / after, per-step time split.
#
#   bash scripts/gpu_smollm2_grpo.sh OUT_DIR [extra train.py overrides, e.g. --grpo.prompts_per_step 32]
#
# 1. installs the carried wheels whose distribution is missing (Ray, torchdata, gguf, ...: every *.whl in
#    $WHEEL_DIRS) into a temp site on PYTHONPATH (Ray's actors inherit it);
# 2. SmolLM2 to $SMOLLM2_HF_DIR unless already there: the GGUF joined from part A ($GGUF_A_DIR, left on the
#    machine by an earlier call) and part B ($GGUF_B_DIR), SHA-256 checked, converted (scripts/convert_gguf_to_hf.py);
# 3. the prompts: $PROMPTS_DIR/{train,eval}.jsonl (scripts/make_grpo_math_prompts.py, made beforehand);
# 4. held-out eval of the base model with HF generate (scripts/eval_math.py, greedy; HF_EVAL=0 skips 4 and 6);
# 5. GRPO (train_configs/smollm2_135m_grpo.toml, a fresh run dir) under a wall-clock budget: the whole script
#    aims to end within $TOTAL_BUDGET_S of its start, $RESERVE_S of it kept for what follows the last step
#    (final engine eval, export, Ray shutdown, step 6). On CUDA the weight sync is cuda_ipc; when that run fails
#    (or logs nothing in FIRST_LOG_S = 240 s: stopped), it is run again with the object store (the summary says
#    which one ran; OUT_DIR/weight_sync_fallback.txt when the fallback ran);
#    the engine's greedy eval of the 200 held-out prompts at step 0 and at the last step is the "before / after";
# 6. held-out eval of the export with HF generate (an independent check of the engine's numbers);
# 7. OUT_DIR/summary.json + summary.txt (the table, printed last), train_metrics.jsonl, samples.jsonl,
#    train_config.json, {base,grpo}_eval.json, grpo.log.
# Knobs (environment): PYTHON, GGUF_A_DIR (/tmp/keep/gguf), GGUF_B_DIR (data/smollm2_gguf_b), WHEEL_DIRS
# ("/tmp/keep/whl data/smollm2_gguf_b"), SMOLLM2_HF_DIR (outputs/smollm2-135m-instruct), RUN_DIR
# (outputs/smollm2_135m_grpo_demo), PROMPTS_DIR (data/grpo_math), TOTAL_BUDGET_S (540), RESERVE_S (80),
# WEIGHT_SYNC (auto: cuda_ipc on CUDA, else object_store), FIRST_LOG_S (240), HF_EVAL (1), EVAL_LIMIT, EVAL_BATCH (200),
# EVAL_MAX_NEW_TOKENS (192). A CPU dry run scales it down with overrides (README "RL: GRPO").
set -euo pipefail
OUT=${1:?usage: bash scripts/gpu_smollm2_grpo.sh OUT_DIR [train.py overrides...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_DEDUP_LOGS=0
PY=${PYTHON:-$(command -v python3 || command -v python)}
GGUF_A_DIR=${GGUF_A_DIR:-/tmp/keep/gguf}
GGUF_B_DIR=${GGUF_B_DIR:-data/smollm2_gguf_b}
WHEEL_DIRS=${WHEEL_DIRS:-/tmp/keep/whl data/smollm2_gguf_b}
HF_DIR=${SMOLLM2_HF_DIR:-outputs/smollm2-135m-instruct}
RUN_DIR=${RUN_DIR:-outputs/smollm2_135m_grpo_demo}
PROMPTS_DIR=${PROMPTS_DIR:-data/grpo_math}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-80}
HF_EVAL=${HF_EVAL:-1}
CONFIG=train_configs/smollm2_135m_grpo.toml
EVAL_ARGS=(--eval-file "$PROMPTS_DIR/eval.jsonl" --batch-size "${EVAL_BATCH:-200}" --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-192}")
if [ -n "${EVAL_LIMIT:-}" ]; then EVAL_ARGS+=(--limit "$EVAL_LIMIT"); fi
t_start=$(date +%s)

main() {
stamp() { echo "[grpo-demo +$(( $(date +%s) - t_start ))s] $*"; }
stamp "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), python $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

# -- 1. wheels whose distribution is not installed (name = the wheel file's name up to the first "-")
site=/tmp/smollm2_grpo_site
wheels=()
seen=" "
# shellcheck disable=SC2086
for whl in $(ls $(for d in $WHEEL_DIRS; do echo "$d/*.whl"; done) 2>/dev/null || true); do
  dist=$(basename "$whl" | cut -d- -f1)
  case "$seen" in *" $dist "*) continue ;; esac  # the same distribution carried twice: the first one found
  seen="$seen$dist "
  if ! "$PY" -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$dist" 2>/dev/null; then
    wheels+=("$whl")
  fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  rm -rf "$site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  stamp "installed ${#wheels[@]} wheels into $site: $(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  stamp "every carried wheel's distribution is already installed"
fi
for pkg in ray torchdata; do
  "$PY" -c "import $pkg" || { echo "error: $pkg does not import; carry its wheel (WHEEL_DIRS=$WHEEL_DIRS)"; exit 1; }
done

# -- 2. the base model: the GGUF parts joined in the order of their names (…part00, …part01), checked, converted
if "$PY" -c "import sys; sys.path.insert(0, 'scripts'); from convert_gguf_to_hf import is_complete_hf_folder as ok; sys.exit(0 if ok(sys.argv[1]) else 1)" "$HF_DIR"; then
  stamp "base model: $HF_DIR (already converted)"
else
  parts=$(ls "$GGUF_A_DIR"/*.gguf.part* "$GGUF_B_DIR"/*.gguf.part* 2>/dev/null | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 || true)
  n_parts=$(echo "$parts" | grep -c part || true)
  [ -s "$GGUF_B_DIR/SHA256SUMS" ] || { echo "error: $GGUF_B_DIR/SHA256SUMS is missing (scripts/pack_smollm2_for_device.sh writes it)"; exit 1; }
  if [ "$n_parts" -lt 2 ]; then
    echo "error: no SmolLM2 weights: $HF_DIR is not a conversion and the GGUF parts are not both there"
    echo "  (part A in GGUF_A_DIR=$GGUF_A_DIR, part B in GGUF_B_DIR=$GGUF_B_DIR; found: ${parts:-none})"
    exit 1
  fi
  gguf_file=/tmp/$(basename "$(echo "$parts" | head -1)" .part00)
  # shellcheck disable=SC2086
  cat $parts > "$gguf_file"
  want=$(cut -d' ' -f1 "$GGUF_B_DIR/SHA256SUMS")
  have=$(sha256sum "$gguf_file" | cut -d' ' -f1)
  [ "$want" = "$have" ] || { echo "error: the joined GGUF ($n_parts parts) has sha256 $have, expected $want"; exit 1; }
  stamp "joined $n_parts GGUF parts into $gguf_file (sha256 ok); converting"
  "$PY" scripts/convert_gguf_to_hf.py --out "$HF_DIR" --gguf "$gguf_file"
  rm -f "$gguf_file"
fi
stamp "base model ready"

# -- 3. prompts
for f in "$PROMPTS_DIR/train.jsonl" "$PROMPTS_DIR/eval.jsonl"; do
  [ -s "$f" ] || { echo "error: $f is missing: make it with scripts/make_grpo_math_prompts.py and carry $PROMPTS_DIR"; exit 1; }
done
stamp "prompts: $(wc -l < "$PROMPTS_DIR/train.jsonl") train, $(wc -l < "$PROMPTS_DIR/eval.jsonl") held out"

# -- 4. the base model's held-out accuracy (HF generate)
if [ "$HF_EVAL" = 1 ]; then
  "$PY" scripts/eval_math.py --hf-dir "$HF_DIR" "${EVAL_ARGS[@]}" --out "$OUT/base_eval.json"
  stamp "base eval done"
fi

# -- 5. GRPO under the budget (a fresh run dir: an old one would be resumed)
sync=${WEIGHT_SYNC:-auto}
if [ "$sync" = auto ]; then sync=$([ "$cuda" = 1 ] && echo cuda_ipc || echo object_store); fi
run_grpo() {
  local budget=$(( TOTAL_BUDGET_S - ($(date +%s) - t_start) - RESERVE_S ))
  [ "$budget" -ge 30 ] || { echo "error: $budget s left for GRPO (TOTAL_BUDGET_S=$TOTAL_BUDGET_S, RESERVE_S=$RESERVE_S)"; return 1; }
  stamp "GRPO: weight sync $1, time budget ${budget}s"
  rm -rf "$RUN_DIR"
  # a hang (rather than an error) must not eat the call: the budget plus the final eval / export / shutdown
  timeout -k 10 $(( budget + RESERVE_S / 2 )) "$PY" train.py --config "$CONFIG" --job.output_dir "$RUN_DIR" --model.hf_path "$HF_DIR" \
    --grpo.prompts "$PROMPTS_DIR/train.jsonl" --grpo.eval_prompts "$PROMPTS_DIR/eval.jsonl" \
    --grpo.time_budget_s "$budget" --grpo.weight_sync "$1" "${@:2}" &
  local pid=$! t0=$SECONDS rc=0
  # cuda_ipc has never run on a GPU: when its run has logged nothing (the first sync comes before the step-0
  # eval) after FIRST_LOG_S, it is stopped (SIGTERM: Ray is shut down) so that the fallback still has time
  while [ "$1" = cuda_ipc ] && kill -0 "$pid" 2>/dev/null; do
    if [ $(( SECONDS - t0 )) -gt "${FIRST_LOG_S:-240}" ] && [ ! -s "$RUN_DIR/metrics.jsonl" ]; then
      stamp "nothing logged after ${FIRST_LOG_S:-240}s with cuda_ipc: stopping this run"
      kill -TERM "$pid" 2>/dev/null || true  # timeout passes it on to train.py
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null && sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then
        pkill -KILL -P "$pid" 2>/dev/null || true  # train.py, by its parent's pid
        kill -KILL "$pid" 2>/dev/null || true
      fi
      break
    fi
    sleep 2
  done
  wait "$pid" || rc=$?
  return "$rc"
}
steps_logged() { if [ -s "$RUN_DIR/metrics.jsonl" ]; then grep -c '"time/step"' "$RUN_DIR/metrics.jsonl" || true; else echo 0; fi; }
if run_grpo "$sync" "$@"; then
  :
elif [ "$sync" = cuda_ipc ]; then
  n=$(steps_logged)
  stamp "GRPO with cuda_ipc failed after $n steps; again with the object store (the log above says why)"
  echo "the cuda_ipc run failed after $n steps; the object store run replaced it" > "$OUT/weight_sync_fallback.txt"
  [ -s "$RUN_DIR/metrics.jsonl" ] && cp "$RUN_DIR/metrics.jsonl" "$OUT/train_metrics_cuda_ipc_failed.jsonl"
  sync=object_store
  run_grpo "$sync" "$@"
else
  exit 1
fi
cp "$RUN_DIR/metrics.jsonl" "$OUT/train_metrics.jsonl"
cp "$RUN_DIR/config.json" "$OUT/train_config.json"
[ -f "$RUN_DIR/samples.jsonl" ] && cp "$RUN_DIR/samples.jsonl" "$OUT/samples.jsonl"
stamp "GRPO done"

# -- 6. the export's held-out accuracy (HF generate)
if [ "$HF_EVAL" = 1 ]; then
  "$PY" scripts/eval_math.py --hf-dir "$RUN_DIR/hf" "${EVAL_ARGS[@]}" --out "$OUT/grpo_eval.json"
  stamp "grpo eval done"
fi

# -- 7. summary
"$PY" scripts/summarize_grpo_run.py "$OUT" --weight-sync "$sync" --seconds "$(( $(date +%s) - t_start ))"
stamp "done"
}

main "$@" 2>&1 | tee -a "$OUT/grpo.log"
