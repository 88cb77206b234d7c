#!/usr/bin/env bash
# Rehearses a pod run on one machine: N processes on localhost with CPU collectives (gloo).
#   launch/local_cpu.sh N humpback train --config=configs/toy.py --workdir=runs/x
# Each process gets HUMPBACK_DEVICES_PER_PROCESS CPU devices (default 4); logs go to
# ${HUMPBACK_LOG_DIR:-runs/local_cpu_logs}/process_<i>.log and process 0 also prints to the terminal.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes="$1"
shift
port="${HUMPBACK_PORT:-$((20000 + RANDOM % 20000))}"
log_dir="${HUMPBACK_LOG_DIR:-runs/local_cpu_logs}"
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < num_processes; i++)); do
  (
    export HUMPBACK_COORDINATOR="localhost:${port}"
    export HUMPBACK_NUM_PROCESSES="$num_processes"
    export HUMPBACK_PROCESS_ID="$i"
    export JAX_NUM_CPU_DEVICES="${HUMPBACK_DEVICES_PER_PROCESS:-4}"
    export JAX_PLATFORMS=cpu
    if [ "$i" -eq 0 ]; then
      "$@" 2>&1 | tee "${log_dir}/process_${i}.log"
    else
      "$@" >"${log_dir}/process_${i}.log" 2>&1
    fi
  ) &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
