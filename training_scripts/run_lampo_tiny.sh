#!/usr/bin/env bash
# The embedded default: SFT warm-up -> LamPO RL -> held-out evaluation of a tiny model on a synthetic arithmetic
# task, offline, on CPU (about 5 minutes on 2 cores). Run it again after a kill to resume.
#   bash training_scripts/run_lampo_tiny.sh [key=value ...]      e.g. run.dir=runs/tiny2 rl.iterations=20
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pipeline run configs/tiny.yaml "$@"
