#!/usr/bin/env bash
# Multi-host training under SLURM: one task per host, every task runs the same command.
# jax.distributed.initialize() reads the SLURM environment (coordinator, process count and
# id), so nothing else is needed. Usage:
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_slurm.sh \
#       configs/nvium-1.5b.yaml data.path=/data/c4 mesh.data=4 mesh.fsdp=8
#SBATCH --job-name=nvium
#SBATCH --output=slurm-%j.out
#SBATCH --signal=TERM@120
set -euo pipefail
CONFIG=${1:?usage: launch_slurm.sh CONFIG.yaml [key=value ...]}
shift
# --signal=TERM@120 gives every task a SIGTERM two minutes before the time limit: the
# trainer saves a checkpoint and exits cleanly, and resubmitting the job resumes it.
srun --kill-on-bad-exit=1 nvium train --config "$CONFIG" "$@"
