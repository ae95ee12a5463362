#!/usr/bin/env bash
# torchrun on one node (or one node of several, with a static rendezvous).
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
#
#   NPROC=8 launch/torchrun.sh recipes/mistral_7b_instruct.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh X.yaml   (run on each node)
#   RADIS_CPU=1 launch/torchrun.sh recipes/smollm2_cpu.yaml                    # 2 CPU ranks, gloo
#
# RADIS_COMMAND=generate or evaluate runs that command on the same ranks (default: train).
# Environment: NPROC (ranks per node; default: visible GPUs, or 2 with RADIS_CPU=1),
# NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
# Extra arguments are config overrides, passed through.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
source "$(dirname "$0")/common.sh"
COMMAND=$(radis_command) || exit 2
NPROC=$(radis_ranks_per_node NPROC) || exit 2
cmd=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
     -m radis.cli "$COMMAND" --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
