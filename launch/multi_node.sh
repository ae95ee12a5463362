#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (pdsh over ssh), started on one node.
#
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node.sh CONFIG.yaml [key=value ...]
#
# hostfile (DeepSpeed format), one line per node:   node0 slots=8
#                                                   node1 slots=8
# Every node needs the same checkout and virtual environment at the same path,
# passwordless ssh from this node, and `output_dir` / `data.cache_dir` on a file system
# shared by all nodes (checkpoints are renamed into place by rank 0).
#
# Environment: HOSTFILE (required), MASTER_ADDR (default: first host of HOSTFILE),
# MASTER_PORT (29500), LAUNCHER (pdsh; or openmpi, mvapich, slurm), RADIS_CPU=1 for
# CPU ranks (slots= ranks per node, gloo, OMP_NUM_THREADS=1).
# Extra arguments are config overrides, passed through.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: HOSTFILE=hostfile $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: <host> slots=<gpus>)}"
if [[ ! -f "$HOSTFILE" ]]; then
  echo "$0: HOSTFILE $HOSTFILE: no such file" >&2
  exit 2
fi
CONFIG=$1
shift
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
source "$(dirname "$0")/common.sh"
# Exported variables that pdsh must carry to the other nodes are listed in
# ~/.deepspeed_env (one NAME=value per line), as the DeepSpeed launcher reads it.
cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank
     --module radis.cli train --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
