#!/usr/bin/env bash
# torchrun wrapper. Usage: NGPU=8 CONFIG_FILE=train_configs/qwen3_1.7b_sft.toml ./run_train.sh [--section.key VALUE ...]
set -euo pipefail
NGPU=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_sft.toml}
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NGPU" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --local-ranks-filter="${LOG_RANK:-0}" --role=rank --tee=3 \
  train.py --config "$CONFIG_FILE" "$@"
