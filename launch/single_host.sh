#!/usr/bin/env bash
# Single host, all local accelerators (or CPU): one process drives every device of the mesh.
#   bash launch/single_host.sh configs/seed_mbv3.py runs/seed_mbv3 --config.batch_size=512
set -euo pipefail
CONFIG=${1:?usage: single_host.sh CONFIG WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: single_host.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
exec python -m disco_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
