#!/usr/bin/env bash
# TPU VM pod: create (or reuse) a TPU VM, copy this checkout to every worker, install, run.
#   ZONE=us-central2-b ACCELERATOR=v4-32 bash launch/tpu_pod.sh my-pod \
#       configs/seed_mbv3.py /mnt/shared/runs/seed_mbv3 --config.data.data_dir=/mnt/shared/tfds
# Every worker runs the same command; jax finds the pod's other workers itself
# (--distributed=on). WORKDIR must be one directory all workers see (Filestore/NFS mount):
# orbax writes each checkpoint from all workers. Re-running the script resumes the run.
# SPOT=1 asks for a preemptible VM: its SIGTERM makes the run checkpoint and exit 0.
set -euo pipefail
NAME=${1:?usage: tpu_pod.sh TPU_NAME CONFIG WORKDIR [--config.x=y ...]}
CONFIG=${2:?usage: tpu_pod.sh TPU_NAME CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${3:?usage: tpu_pod.sh TPU_NAME CONFIG WORKDIR [--config.x=y ...]}
shift 3
ZONE=${ZONE:?set ZONE, e.g. us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
TPU=(gcloud compute tpus tpu-vm)

if ! "${TPU[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  "${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$VERSION" ${SPOT:+--spot}
fi

# Copy the code as it is here (uncommitted edits included) rather than cloning a remote.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$ROOT" -czf /tmp/disco_jax_code.tgz --exclude=.git --exclude=runs --exclude='*.pyc' .
"${TPU[@]}" scp /tmp/disco_jax_code.tgz "$NAME":disco_jax_code.tgz --zone "$ZONE" --worker=all

ARGS=$(printf ' %q' "$@")
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "set -e
  mkdir -p ~/disco_jax && tar -xzf ~/disco_jax_code.tgz -C ~/disco_jax && cd ~/disco_jax
  [ -d ~/venv ] || python3 -m venv ~/venv
  . ~/venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q --no-deps -e .
  python -m disco_jax.main --distributed=on --config=$CONFIG --workdir=$WORKDIR $ARGS"
