#!/usr/bin/env bash
# N processes on this machine (e.g. one per GPU group, or CPU processes to try multi-host code):
#   NPROC=2 DEVICES_PER_PROC=2 bash launch/local_multiprocess.sh configs/moco_v2_r50.py:smoke /tmp/mp
# Each process gets --coordinator_address/--num_processes/--process_id; on CPU the collectives
# go through gloo. Each process reads its own data shard; process 0 writes logs and metrics.
set -euo pipefail
CONFIG=${1:?usage: local_multiprocess.sh CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: local_multiprocess.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
NPROC=${NPROC:-2}
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < NPROC; i++)); do
  if [ -n "${DEVICES_PER_PROC:-}" ]; then
    export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROC"
  fi
  python -m disco_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
    --coordinator_address "127.0.0.1:$PORT" --num_processes "$NPROC" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
