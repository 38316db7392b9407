#!/usr/bin/env bash
# The per-node launch line of deploy/slurm/train.sbatch: `srun` runs this once on every node of the allocation.
# It also runs without srun (one node, the SLURM variables set by hand).
#
# Inputs (environment): CONFIG_FILE (required), SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST,
# HEAD_NODE (default: the first host of SLURM_JOB_NODELIST), RDZV_PORT (default 29500), MAX_RESTARTS (default 0),
# NPROC_PER_NODE (ranks on this node; default below). Extra arguments are config overrides (--section.key VALUE).
# LAUNCH_DRY_RUN=1 prints the torchrun line and exits (to check the rank count and rendezvous on a node).
#
# Ranks per node, when NPROC_PER_NODE is unset: the GPUs SLURM allotted (SLURM_GPUS_ON_NODE), else the GPUs
# torch sees (asked only where /dev/nvidia* or /dev/kfd exist), else one rank per task the job asked for on each node
# (POSTTRAIN_TASKS_PER_NODE, which train.sbatch copies from --ntasks-per-node), else one per allotted CPU
# (SLURM_CPUS_ON_NODE), else 1.
#
# Signals: SIGUSR1 (the time-limit warning) is for the trainers only. SLURM delivers a step's signals to every
# process of the step, and torchrun does not handle SIGUSR1 (its default action would kill it and fail the
# job), so torchrun runs with SIGUSR1 ignored; the trainers install their own handler. SIGTERM / SIGUSR1 sent
# to this script are passed to the trainers (torchrun's children); they checkpoint at the next step boundary
# and exit 0, then torchrun and this script exit 0. SIGTERM that SLURM sends to every process (preemption,
# `scontrol requeue`, scancel) also reaches torchrun, which passes it on and kills workers still alive 30 s later.
set -euo pipefail

: "${CONFIG_FILE:?set CONFIG_FILE to a train_configs/*.toml file}"
: "${SLURM_JOB_ID:?not inside a SLURM allocation (SLURM_JOB_ID is unset)}"
NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
if [[ -z "${HEAD_NODE:-}" ]]; then
  HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1) || true
  # Outside SLURM (no scontrol, or no slurm.conf for it to read): a plain "host1,host2" list.
  [[ -n "$HEAD_NODE" ]] || HEAD_NODE=${SLURM_JOB_NODELIST%%,*}
fi
RDZV_PORT=${RDZV_PORT:-29500}

positive_int() { [[ "${1:-}" =~ ^[0-9]+$ ]] && (( $1 > 0 )); }
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if positive_int "${SLURM_GPUS_ON_NODE:-}"; then
    NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  else
    NPROC_PER_NODE=0
    if compgen -G "/dev/nvidia[0-9]*" >/dev/null || [[ -e /dev/kfd ]]; then  # a GPU node: ask torch
      NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count())")
    fi
    if ! positive_int "$NPROC_PER_NODE"; then
      NPROC_PER_NODE=${POSTTRAIN_TASKS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
    fi
  fi
fi
if ! positive_int "$NPROC_PER_NODE"; then
  echo "[launch.sh] error: NPROC_PER_NODE=$NPROC_PER_NODE is not a positive whole number" >&2
  exit 2
fi
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
positive_int "$CPUS" || CPUS=1

# NCCL over InfiniBand / RoCE; adjust the interface names to the cluster (ip -br link on a compute node).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # a hung collective raises instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
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
echo "[launch.sh] node $NODE_RANK/$NNODES head=$HEAD_NODE:$RDZV_PORT job=$SLURM_JOB_ID" \
  "ranks=$NPROC_PER_NODE OMP_NUM_THREADS=$OMP_NUM_THREADS: ${torchrun_cmd[*]}"
[[ -n "${LAUNCH_DRY_RUN:-}" ]] && exit 0

TORCHRUN_PID=""
forward() {  # to the training processes (torchrun's children), not to torchrun, which would stop them
  echo "[launch.sh] $1 received: asking the training processes to checkpoint and exit"
  [[ -n "$TORCHRUN_PID" ]] && pkill "-$1" -P "$TORCHRUN_PID" || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# An ignored signal stays ignored across exec: torchrun (and its children until the trainers install their
# handler) never dies of SIGUSR1.
( trap '' USR1; exec "${torchrun_cmd[@]}" ) &
TORCHRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until torchrun itself has exited.
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
  wait "$TORCHRUN_PID" || true
done
status=0
wait "$TORCHRUN_PID" || status=$?
exit "$status"
