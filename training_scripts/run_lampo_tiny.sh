#!/usr/bin/env bash
# The embedded default: SFT warm-up -> LamPO RL -> held-out evaluation of a tiny model on a synthetic arithmetic
# task, offline, on CPU (about 5 minutes on 2 cores). Run it again after a kill to resume.
#   bash training_scripts/run_lampo_tiny.sh [key=value ...]      e.g. run.dir=runs/tiny2 rl.iterations=20
#   DRY_RUN=1 bash training_scripts/run_lampo_tiny.sh            prints the plan (one process) instead of running
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  exec python3 -m pipeline plan configs/tiny.yaml "$@" --gpus-per-node 1 --gpu-memory-gib "${GPU_MEM_GIB:-80}"
fi
exec python3 -m pipeline run configs/tiny.yaml "$@"
