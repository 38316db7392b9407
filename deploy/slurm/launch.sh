#!/usr/bin/env bash
# The per-node launch line of deploy/slurm/train.sbatch: `srun` runs this once on every node of the allocation.
# It also runs without srun (one node, the SLURM variables set by hand) -- that is how CI tests it.
#
# Inputs (environment): CONFIG_FILE (required), SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST,
# optional NPROC_PER_NODE (default: visible GPUs, at least 1), HEAD_NODE (default: the first host of
# SLURM_JOB_NODELIST), RDZV_PORT (default 29500). Extra arguments are config overrides (--section.key VALUE).
#
# Preemption: SIGTERM / SIGUSR1 received here are passed to the training processes (torchrun's children),
# which checkpoint at the next step boundary and exit 0; torchrun then exits 0 and so does this script.
set -euo pipefail

: "${CONFIG_FILE:?set CONFIG_FILE to a train_configs/*.toml file}"
: "${SLURM_JOB_ID:?not inside a SLURM allocation (SLURM_JOB_ID is unset)}"
NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
if [[ -z "${HEAD_NODE:-}" ]]; then
  if command -v scontrol >/dev/null 2>&1; then
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    HEAD_NODE=${SLURM_JOB_NODELIST%%,*}  # a plain "host1,host2" list (no scontrol outside SLURM)
  fi
fi
RDZV_PORT=${RDZV_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

# NCCL over InfiniBand / RoCE; adjust the interface names to the cluster (ip -br link on a compute node).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # a hung collective raises instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Restarts (--max_restarts): a fresh rendezvous store each round. torchrun's agents otherwise share one store
# across rounds and the restarted workers can read the previous round's keys (pytorch/pytorch#135712);
# posttrain scopes them by TORCHELASTIC_RESTART_COUNT, which is exact on one node but may differ between nodes.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

cd "$(dirname "$0")/../.."
torchrun_cmd=(python -m torch.distributed.run
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID"
  --max_restarts="${MAX_RESTARTS:-0}"
  train.py --config "$CONFIG_FILE" "$@")
echo "[launch.sh] node $NODE_RANK/$NNODES head=$HEAD_NODE:$RDZV_PORT job=$SLURM_JOB_ID: ${torchrun_cmd[*]}"

"${torchrun_cmd[@]}" &
TORCHRUN_PID=$!
forward() {  # to the training processes (torchrun's children), not to torchrun, which would stop them
  echo "[launch.sh] $1 received: asking the training processes to checkpoint and exit"
  pkill "-$1" -P "$TORCHRUN_PID" || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# `wait` returns early when a trapped signal arrives; keep waiting until torchrun itself has exited.
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
  wait "$TORCHRUN_PID" || true
done
status=0
wait "$TORCHRUN_PID" || status=$?
exit "$status"
