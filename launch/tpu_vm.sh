#!/usr/bin/env bash
# TPU VM slices: create (or reuse), install, run one of our commands on every worker, fetch logs, delete.
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [VERSION]   e.g. create hb us-east5-a v5p-64
#   launch/tpu_vm.sh install NAME ZONE                        copy this repo to all workers and pip install [tpu]
#   launch/tpu_vm.sh run NAME ZONE COMMAND...                 e.g. run hb us-east5-a humpback pipeline --config=...
#   launch/tpu_vm.sh logs NAME ZONE                           fetch each worker's log into runs/tpu_logs/
#   launch/tpu_vm.sh delete NAME ZONE
set -euo pipefail
action="${1:-}"
name="${2:-}"
zone="${3:-}"
if [ -z "$action" ] || [ -z "$name" ] || [ -z "$zone" ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
shift 3
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}
case "$action" in
  create)
    accelerator="${1:?accelerator type, e.g. v5p-64}"
    version="${2:-v2-alpha-tpuv5}"
    if gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
      echo "reusing $name"
    else
      gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$version"
    fi
    ;;
  install)
    tar czf /tmp/humpback_src.tgz --exclude=runs --exclude=.git .
    gcloud compute tpus tpu-vm scp /tmp/humpback_src.tgz "$name":~/ --zone="$zone" --worker=all
    ssh_all "mkdir -p ~/humpback && tar xzf ~/humpback_src.tgz -C ~/humpback && cd ~/humpback && python3 -m pip install -q -e '.[tpu]'"
    ;;
  run)
    printf -v cmd '%q ' "$@"
    ssh_all "cd ~/humpback && nohup ${cmd} > ~/humpback.log 2>&1; tail -n 20 ~/humpback.log"
    ;;
  logs)
    mkdir -p runs/tpu_logs
    workers=$(gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(networkEndpoints[].ipAddress)' | tr ';,' '  ' | wc -w)
    for ((w = 0; w < workers; w++)); do
      gcloud compute tpus tpu-vm scp "$name":~/humpback.log "runs/tpu_logs/worker_${w}.log" --zone="$zone" --worker="$w"
    done
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    echo "unknown action: $action" >&2
    exit 2
    ;;
esac
