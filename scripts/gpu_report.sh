#!/usr/bin/env bash
# The GPU report (issue 26): decode speedup and HBM roofline at 1.5b, command buffers, batch 8,
# the Pallas kernel, training MFU — in that order, within a budget (8 minutes by default), into
# OUT_DIR/gpu_report.json and gpu_report.md, rewritten after every section.
#   bash scripts/gpu_report.sh OUT_DIR [--smoke] [--budget-s S] [--sections a,b,...]
# Installs nothing: the project is imported from this checkout (PYTHONPATH), so an image with
# jax, flax, optax, orbax and tensorstore suffices (no grain, no wandb, no network). PYTHON
# picks the interpreter. XLA's persistent compilation cache lives in OUT_DIR/jax_cache, so a
# rerun into the same OUT_DIR skips the compiles; `timeout` ends the whole run at the budget
# plus a minute whatever happens (the files then hold every section finished before).
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: bash scripts/gpu_report.sh OUT_DIR [--smoke] [--budget-s S] [--sections a,b,...]" >&2
  exit 2
fi
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

budget=480
prev=
for arg in "$@"; do
  [[ $arg == --smoke ]] && budget=300  # the driver's own defaults (BUDGET_S in gpu_report.py)
  [[ $prev == --budget-s ]] && budget=${arg%.*}
  [[ $arg == --budget-s=* ]] && budget=${arg#*=} && budget=${budget%.*}
  prev=$arg
done

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$out/jax_cache"
export WANDB_MODE=disabled
cd "$repo"
exec timeout --kill-after=15 "$((budget + 60))" "${PYTHON:-python}" -m scripts.gpu_report "$out" "$@"
