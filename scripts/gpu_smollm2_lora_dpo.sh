#!/usr/bin/env bash
# LoRA against full fine-tuning, and DPO on the model's own answers, on SmolLM2-135M-Instruct in ONE device call.
#
#   bash scripts/gpu_smollm2_lora_dpo.sh OUT_DIR
#
# Phases, each under the call's wall-clock budget (TOTAL_BUDGET_S from the start; a phase that no longer fits
# its minimum is skipped and says so, one that overruns is stopped by `timeout`; a failed phase does not stop
# the others):
#  0. torchdata from a carried wheel when missing ($WHEEL_DIRS); SmolLM2 must already be an HF folder at
#     $SMOLLM2_HF_DIR (scripts/gpu_smollm2_grpo.sh leaves it there);
#  1. SFT rows from the GRPO training prompts ($PROMPTS_DIR/train.jsonl, scripts/make_math_sft_from_prompts.py:
#     the SFT demo's worked solutions; no reasoning-gym needed);
#  2. the base model's held-out accuracy (scripts/eval_math.py on $PROMPTS_DIR/eval.jsonl = the SFT demo's
#     held-out set, greedy);
#  3. preference pairs from the base model's own sampled answers (scripts/make_self_preference_pairs.py):
#     held-out pairs from the held-out questions (first: the budget never cuts them), training pairs from the
#     first $PAIR_TRAIN_QUESTIONS training prompts (as many as $PAIR_BUDGET_S allows); chosen = scored correct by
#     the GRPO math reward, rejected = wrong;
#  4. SFT full, 5. SFT LoRA (rank 16 on every attention / MLP projection): the same data, steps, batch and seed
#     (train_configs/smollm2_135m_sft.toml, fewer steps); each export then evaluated as in 2;
#  6. DPO full, 7. DPO LoRA (train_configs/smollm2_135m_dpo.toml) from the base model; each export evaluated;
#  8. OUT_DIR/summary.json and the table, printed last (scripts/summarize_lora_dpo_run.py).
# OUT_DIR: lora_dpo.log, phases.jsonl, *_eval.json, *_metrics.jsonl, pairs_stats.json, summary.json, summary.txt.
# Knobs (environment): PYTHON, SMOLLM2_HF_DIR (/tmp/keep/smollm2_hf), PROMPTS_DIR (data/grpo_math), WORK_DIR
# (outputs/smollm2_lora_dpo), WHEEL_DIRS (".whl /tmp/keep/whl data/smollm2_gguf_b"), TOTAL_BUDGET_S (530),
# SFT_STEPS (150), SFT_BATCH (16), SFT_SEQ_LEN (1024), SFT_LR (1e-4), SFT_LORA_LR (1e-3), DPO_STEPS (40),
# DPO_BATCH (8), DPO_LR (2e-6), DPO_LORA_LR (2e-5), LORA_RANK (16), PAIR_TRAIN_QUESTIONS (1536), PAIR_EVAL_QUESTIONS
# (200), PAIR_SAMPLES (8), PAIR_TEMPERATURE (0.7), PAIR_MAX_NEW_TOKENS (160), PAIR_BATCH (2048), PAIR_BUDGET_S
# (60), EVAL_LIMIT, EVAL_BATCH (200), EVAL_MAX_NEW_TOKENS (192). A CPU dry run scales these down (README).
set -euo pipefail
OUT=${1:?usage: bash scripts/gpu_smollm2_lora_dpo.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
HF_DIR=${SMOLLM2_HF_DIR:-/tmp/keep/smollm2_hf}
PROMPTS_DIR=${PROMPTS_DIR:-data/grpo_math}
WORK=${WORK_DIR:-outputs/smollm2_lora_dpo}
WHEEL_DIRS=${WHEEL_DIRS:-.whl /tmp/keep/whl data/smollm2_gguf_b}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-530}
LORA_RANK=${LORA_RANK:-16}
EVAL_ARGS=(--eval-file "$PROMPTS_DIR/eval.jsonl" --batch-size "${EVAL_BATCH:-200}" --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-192}")
if [ -n "${EVAL_LIMIT:-}" ]; then EVAL_ARGS+=(--limit "$EVAL_LIMIT"); fi
t_start=$(date +%s)

main() {
stamp() { echo "[lora-dpo +$(( $(date +%s) - t_start ))s] $*"; }
# phase NAME MIN_S CAP_S CMD...: runs CMD under min(CAP_S, what is left of the budget); skipped when less than
# MIN_S is left or when a file it needs (NEEDS, a space-separated list) is missing; one line in phases.jsonl
phase() {
  local name=$1 min_s=$2 cap_s=$3 rc=0 t0 left status
  shift 3
  left=$(( TOTAL_BUDGET_S - ($(date +%s) - t_start) ))
  for f in ${NEEDS:-}; do
    if [ ! -s "$f" ]; then
      stamp "$name: skipped ($f is missing or empty)"
      echo "{\"phase\": \"$name\", \"status\": \"skipped: $f is missing or empty\"}" >> "$OUT/phases.jsonl"
      return 0
    fi
  done
  if [ "$left" -lt "$min_s" ]; then
    stamp "$name: skipped (${left}s left of the budget, needs ${min_s}s)"
    echo "{\"phase\": \"$name\", \"status\": \"skipped: ${left}s left, needs ${min_s}s\"}" >> "$OUT/phases.jsonl"
    return 0
  fi
  [ "$left" -lt "$cap_s" ] && cap_s=$left
  stamp "$name: start (limit ${cap_s}s)"
  t0=$(date +%s)
  timeout -k 10 "$cap_s" "$@" || rc=$?
  status=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="stopped at its ${cap_s}s limit"
  [ "$rc" != 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
  stamp "$name: $status in $(( $(date +%s) - t0 ))s"
  echo "{\"phase\": \"$name\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - t0 ))}" >> "$OUT/phases.jsonl"
}

stamp "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), python $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
rm -f "$OUT/phases.jsonl"

# -- 0. what the data loader needs, and the model
if ! "$PY" -c "import torchdata" 2>/dev/null; then
  # shellcheck disable=SC2086
  whl=$(ls $(for d in $WHEEL_DIRS; do echo "$d/torchdata-*.whl"; done) 2>/dev/null | head -1 || true)
  [ -n "$whl" ] || { echo "error: torchdata is missing and no torchdata wheel is in WHEEL_DIRS=$WHEEL_DIRS"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lora_dpo_site "$whl"
  export PYTHONPATH="/tmp/lora_dpo_site${PYTHONPATH:+:$PYTHONPATH}"
  stamp "installed $(basename "$whl") into /tmp/lora_dpo_site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys; sys.path.insert(0, 'scripts'); from convert_gguf_to_hf import is_complete_hf_folder as ok; sys.exit(0 if ok(sys.argv[1]) else 1)" "$HF_DIR" \
  || { echo "error: $HF_DIR is not a converted SmolLM2 folder (scripts/gpu_smollm2_grpo.sh leaves one; set SMOLLM2_HF_DIR)"; exit 1; }
for f in "$PROMPTS_DIR/train.jsonl" "$PROMPTS_DIR/eval.jsonl"; do
  [ -s "$f" ] || { echo "error: $f is missing: make it with scripts/make_grpo_math_prompts.py and carry $PROMPTS_DIR"; exit 1; }
done
rm -rf "$WORK"
mkdir -p "$WORK"

# -- 1. SFT data
"$PY" scripts/make_math_sft_from_prompts.py "$PROMPTS_DIR/train.jsonl" "$WORK/sft_train.jsonl"

# -- 2. base accuracy, 3. pairs
phase base_eval 20 90 "$PY" scripts/eval_math.py --hf-dir "$HF_DIR" "${EVAL_ARGS[@]}" --out "$OUT/base_eval.json"
phase pairs 30 $(( ${PAIR_BUDGET_S:-60} + 40 )) "$PY" scripts/make_self_preference_pairs.py --hf-dir "$HF_DIR" \
  --prompts "$PROMPTS_DIR/eval.jsonl:${PAIR_EVAL_QUESTIONS:-200}:eval.jsonl" \
  --prompts "$PROMPTS_DIR/train.jsonl:${PAIR_TRAIN_QUESTIONS:-1536}:train.jsonl" --out-dir "$WORK/pairs" \
  --samples "${PAIR_SAMPLES:-8}" --temperature "${PAIR_TEMPERATURE:-0.7}" --max-new-tokens "${PAIR_MAX_NEW_TOKENS:-160}" \
  --batch-size "${PAIR_BATCH:-2048}" --time-budget-s "${PAIR_BUDGET_S:-60}"
[ -f "$WORK/pairs/pairs_stats.json" ] && cp "$WORK/pairs/pairs_stats.json" "$OUT/"

# -- 4-7. training runs, each followed by the held-out eval of its export
train_and_eval() {  # NAME CONFIG MIN_S CAP_S train.py overrides...
  local name=$1 config=$2 min_s=$3 cap_s=$4
  shift 4
  phase "$name" "$min_s" "$cap_s" "$PY" train.py --config "$config" --job.output_dir "$WORK/$name" \
    --model.hf_path "$HF_DIR" --checkpoint.save_final false --checkpoint.export_hf true "$@"
  [ -f "$WORK/$name/metrics.jsonl" ] && cp "$WORK/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
  NEEDS="$WORK/$name/hf/config.json" phase "${name}_eval" 20 90 \
    "$PY" scripts/eval_math.py --hf-dir "$WORK/$name/hf" "${EVAL_ARGS[@]}" --out "$OUT/${name}_eval.json"
  rm -rf "$WORK/$name/checkpoints"
}
sft=(--training.steps "${SFT_STEPS:-150}" --training.batch_size "${SFT_BATCH:-16}" --training.seq_len "${SFT_SEQ_LEN:-1024}"
     --data.path "$WORK/sft_train.jsonl" --lr_scheduler.warmup_steps 10)
lora=(--lora.rank "$LORA_RANK" --lora.alpha $(( 2 * LORA_RANK )))
train_and_eval sft_full train_configs/smollm2_135m_sft.toml 40 150 "${sft[@]}" --optimizer.lr "${SFT_LR:-1e-4}"
train_and_eval sft_lora train_configs/smollm2_135m_sft.toml 40 150 "${sft[@]}" --optimizer.lr "${SFT_LORA_LR:-1e-3}" "${lora[@]}"
dpo=(--training.steps "${DPO_STEPS:-40}" --training.batch_size "${DPO_BATCH:-8}"
     --data.path "$WORK/pairs/train.jsonl" --data.eval_path "$WORK/pairs/eval.jsonl")
NEEDS="$WORK/pairs/train.jsonl $WORK/pairs/eval.jsonl" train_and_eval dpo_full train_configs/smollm2_135m_dpo.toml 40 120 \
  "${dpo[@]}" --optimizer.lr "${DPO_LR:-2e-6}"
NEEDS="$WORK/pairs/train.jsonl $WORK/pairs/eval.jsonl" train_and_eval dpo_lora train_configs/smollm2_135m_dpo.toml 40 120 \
  "${dpo[@]}" --optimizer.lr "${DPO_LORA_LR:-2e-5}" "${lora[@]}"

# -- 8. summary
"$PY" scripts/summarize_lora_dpo_run.py "$OUT" --work-dir "$WORK" --seconds "$(( $(date +%s) - t_start ))"
stamp "done"
}

main "$@" 2>&1 | tee -a "$OUT/lora_dpo.log"
