#!/usr/bin/env bash
# One node, all its GPUs, through the DeepSpeed launcher.
#
#   launch/single_node.sh CONFIG.yaml [key=value ...]
#
#   NUM_GPUS=4 launch/single_node.sh recipes/llama2_7b_chat.yaml train.lr=5e-6
#   RADIS_CPU=1 launch/single_node.sh recipes/smollm2_cpu.yaml     # 2 CPU ranks over gloo
#   CUDA_VISIBLE_DEVICES=2,3 launch/single_node.sh X.yaml           # GPUs 2 and 3 (--include)
#
# RADIS_COMMAND=generate or evaluate runs that command on the same ranks (default: train).
# Environment: NUM_GPUS (default: every visible GPU; with CUDA_VISIBLE_DEVICES, the first
# NUM_GPUS of those), MASTER_PORT (default 29500),
# RADIS_CPU=1 for CPU ranks (NPROC ranks, default 2, OMP_NUM_THREADS=1 each so the ranks
# do not oversubscribe the cores). Extra arguments are config overrides, passed through.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "$0")/common.sh"
COMMAND=$(radis_command) || exit 2
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # empty under RADIS_CPU=1 (common.sh hides CUDA)
  # The chosen GPUs by index: with --num_gpus DeepSpeed would drop CUDA_VISIBLE_DEVICES.
  GPUS=$(radis_visible_gpus NUM_GPUS) || exit 2
  ranks=(--include "localhost:$GPUS")
else
  NPROC=$(radis_ranks_per_node NUM_GPUS) || exit 2
  ranks=(--num_gpus "$NPROC")
fi
# --no_local_rank: the rank comes from LOCAL_RANK, not an appended --local_rank argument.
cmd=(deepspeed "${ranks[@]}" --master_port "$MASTER_PORT" --no_local_rank
     --module radis.cli "$COMMAND" --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
