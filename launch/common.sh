# Sourced by the launch scripts: CPU mode and the count of this node's GPUs.
#
#   radis_ranks_per_node VAR_NAME_OF_OVERRIDE   -> prints the ranks to start on this node
#   radis_command                               -> prints the radis command the ranks run (RADIS_COMMAND)
#   radis_visible_gpus VAR_NAME_OF_OVERRIDE     -> prints the CUDA_VISIBLE_DEVICES indices to
#                                                  use (the first VAR of them when it is set)
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

radis_visible_gpus() {
  # The DeepSpeed launcher drops CUDA_VISIBLE_DEVICES as soon as --num_gpus is given and
  # then uses GPUs 0..N-1, so a launcher names the chosen GPUs (--include) from this list.
  local override=${!1:-} devices=${CUDA_VISIBLE_DEVICES// /} id
  local -a ids
  IFS=, read -ra ids <<< "$devices"
  for id in "${ids[@]}"; do
    if [[ ! "$id" =~ ^[0-9]+$ ]]; then
      echo "$0: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: expected GPU indices such as 2,3 (the DeepSpeed" \
           "launcher takes no UUIDs or MIG names; launch/torchrun.sh does), got '$id'" >&2
      return 2
    fi
  done
  if [[ -n "$override" ]]; then
    if [[ ! "$override" =~ ^[0-9]+$ || "$override" -lt 1 || "$override" -gt ${#ids[@]} ]]; then
      echo "$0: $1=$override: expected 1 to ${#ids[@]}, the GPUs in CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
      return 2
    fi
    ids=("${ids[@]:0:$override}")
  fi
  (IFS=,; echo "${ids[*]}")
}

radis_command() {
  # What the ranks run: RADIS_COMMAND, default train. Generation and evaluation are
  # data-parallel over the same ranks, so every launcher starts them too.
  local command=${RADIS_COMMAND:-train}
  case "$command" in
    train|generate|rationales|evaluate) echo "$command" ;;
    *) echo "$0: RADIS_COMMAND=$command: expected train, generate, rationales or evaluate" >&2
       return 2 ;;
  esac
}
