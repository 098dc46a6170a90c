#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command on every worker.
# jax.distributed.initialize() detects the pod's workers by itself. Usage:
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE configs/nvium-1.5b.yaml data.path=gs://bucket/c4 mesh.fsdp=-1
# The repository must be at ~/nvium_jax on every worker (e.g. git clone there first).
set -euo pipefail
TPU_NAME=${1:?usage: launch_tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [key=value ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
shift 3
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/nvium_jax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]' &&
  .venv/bin/nvium train --config $CONFIG $*"
