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
# RADIS_COMMAND=generate or evaluate runs that command on the same ranks (default: train).
# Environment: HOSTFILE (required), MASTER_ADDR (default: first host of HOSTFILE),
# MASTER_PORT (29500), LAUNCHER (pdsh; or openmpi, mvapich, slurm), RADIS_CPU=1 for
# CPU ranks (slots= ranks per node, gloo, OMP_NUM_THREADS=1).
# Extra arguments are config overrides, passed through. The ranks get this environment's
# CPU-mode, hub and RADIS_* variables through a DeepSpeed env file (see below); anything
# else they need goes in ~/.deepspeed_env (NAME=value lines), as DeepSpeed documents.
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
COMMAND=$(radis_command) || exit 2
# pdsh starts every rank over ssh, this node's too, with only the variables DeepSpeed
# exports (PYTHON*, NCCL*, ...) and the lines of its env file. So this run's own go in an
# env file of the run (DS_ENV_FILE, an absolute path): CPU mode (DS_ACCELERATOR,
# OMP_NUM_THREADS), the hub and cache settings, and every RADIS_* variable, after the
# lines of the user's ~/.deepspeed_env and ./.deepspeed_env, which DS_ENV_FILE would
# otherwise hide (a later line wins, so this environment's values do).
env_file=$(mktemp "${TMPDIR:-/tmp}/radis-deepspeed-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
for user_file in "$HOME/.deepspeed_env" ./.deepspeed_env; do
  if [[ -f "$user_file" ]]; then
    grep -v '^[[:space:]]*$' "$user_file" >> "$env_file" || true
  fi
done
for name in DS_ACCELERATOR OMP_NUM_THREADS HF_HOME HF_HUB_OFFLINE TRANSFORMERS_OFFLINE TOKENIZERS_PARALLELISM \
            TRITON_CACHE_DIR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME $(compgen -e | grep '^RADIS_' || true); do
  if [[ -n "${!name+set}" ]]; then
    printf '%s=%s\n' "$name" "${!name}" >> "$env_file"
  fi
done
export DS_ENV_FILE=$env_file
# ssh keep-alives on every pdsh connection: a host that dies or is cut off ends its
# session after 3 unanswered probes 3 s apart, so pdsh and the runner exit (non-zero)
# instead of waiting for a TCP timeout of hours. Appended to the user's own options.
export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=3 -o ServerAliveCountMax=3 -o BatchMode=yes"
cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank
     --module radis.cli "$COMMAND" --config "$CONFIG" "$@")
echo "+ ${cmd[*]}" >&2
# Stopping (Ctrl-C, a scheduler's SIGTERM): this job's ranks and no other job's. DeepSpeed's
# runner, on SIGINT/SIGTERM, runs `pkill -f "<python> -u -m deepspeed.launcher.launch"` on
# every host, which matches every DeepSpeed job of this venv there, other users' runs
# included. So the runner gets no signal: it runs in a session of its own (a terminal's
# Ctrl-C reaches only this script), and on a signal this script SIGKILLs the runner's
# process group (runner, pdsh, ssh clients: no clean-up of DeepSpeed's runs) and stops the
# per-host launchers of this job alone, matched by its master address and port, which no
# other live job shares (a second job there could not bind them). Each per-host launcher
# stops its ranks as it exits (DeepSpeed's launch.py). Not exec: the env file is removed at
# the end.
hosts=$(awk 'NF && $1 !~ /^#/ {print $1}' "$HOSTFILE" | paste -sd, -)
stop_job() {
  trap - INT TERM
  echo "$0: stopping this job (master $MASTER_ADDR:$MASTER_PORT) on $hosts" >&2
  if [[ "${LAUNCHER:-pdsh}" != pdsh ]]; then
    # mpirun and srun stop their remote ranks themselves when told to
    kill -TERM -- "-$runner" 2>/dev/null || true
    wait "$runner" || true
  else
    kill -KILL -- "-$runner" 2>/dev/null || true
    # [d]: the pattern does not match the shell that runs pkill on the host
    local pattern="[d]eepspeed[.]launcher[.]launch .*--master_addr=${MASTER_ADDR//./[.]} --master_port=$MASTER_PORT( |\$)"
    local stop="pkill -TERM -f -- '$pattern'; for i in \$(seq 20); do pgrep -f -- '$pattern' > /dev/null || exit 0; sleep 0.5; done; pkill -KILL -f -- '$pattern'; true"
    PDSH_RCMD_TYPE=ssh timeout 60 pdsh -S -w "$hosts" "$stop" \
      || echo "$0: could not reach every host to stop the job's ranks (see above)" >&2
  fi
  exit 143
}
trap stop_job INT TERM
setsid "${cmd[@]}" &
runner=$!
wait "$runner"
