# Sourced by the launch scripts: CPU mode and the count of this node's GPUs.
#
#   radis_ranks_per_node VAR_NAME_OF_OVERRIDE   -> prints the ranks to start on this node
#
# RADIS_CPU=1: ranks on CPU cores (NPROC, default 2) over gloo; CUDA is hidden so that a
# GPU node really runs on CPU, DS_ACCELERATOR=cpu for DeepSpeed, and one OpenMP thread
# per rank so the ranks do not oversubscribe the cores. Otherwise: the GPUs torch can see
# (CUDA_VISIBLE_DEVICES respected, MIG slices counted as torch counts them).
if [[ "${RADIS_CPU:-0}" == "1" ]]; then
  export CUDA_VISIBLE_DEVICES=""
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

radis_ranks_per_node() {
  local override=${!1:-}
  if [[ -n "$override" ]]; then
    echo "$override"
  elif [[ "${RADIS_CPU:-0}" == "1" ]]; then
    echo "${NPROC:-2}"
  else
    local n
    n=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ "$n" -lt 1 ]]; then
      echo "$0: no GPU visible to torch; set $1, or RADIS_CPU=1 for CPU ranks" >&2
      return 2
    fi
    echo "$n"
  fi
}
