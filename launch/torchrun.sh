#!/usr/bin/env bash
# torchrun on one node (or one node of several, with a static rendezvous).
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
#
#   NPROC=8 launch/torchrun.sh recipes/mistral_7b_instruct.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh X.yaml   (run on each node)
#   RADIS_CPU=1 launch/torchrun.sh recipes/smollm2_cpu.yaml                    # 2 CPU ranks, gloo
#
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
if [[ "${RADIS_CPU:-0}" == "1" ]]; then
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  if [[ "$NPROC" -lt 1 ]]; then
    echo "$0: no GPU found (nvidia-smi); set NPROC, or RADIS_CPU=1 for CPU ranks" >&2
    exit 2
  fi
fi
cmd=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
     -m radis.cli train --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
