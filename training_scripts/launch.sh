#!/usr/bin/env bash
# The GPU launchers' shared body: torchrun over NPROC processes per node (NNODES nodes) running one config, or its
# plan when DRY_RUN=1. Called by the run_lampo_*.sh scripts as  launch.sh CONFIG [key=value ...].
#   NPROC        processes (GPUs) per node, default 8
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   as torchrun expects (multi-node: run the same command on every node)
#   TP, PP       override backend.tensor_parallel / pipeline_parallel; unset, the config's layout is used
#   DRY_RUN=1    print the process layout and per-GPU memory plan (python -m pipeline plan, no GPU needed) instead of
#                launching, and exit 2 if the layout cannot work; GPU_MEM_GIB sets the GPU size (default 80)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=$1
shift
NPROC=${NPROC:-8}
LAYOUT=()
if [[ -n "${TP:-}" ]]; then LAYOUT+=("backend.tensor_parallel=$TP"); fi
if [[ -n "${PP:-}" ]]; then LAYOUT+=("backend.pipeline_parallel=$PP"); fi
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  exec python3 -m pipeline plan "$CONFIG" ${LAYOUT[@]+"${LAYOUT[@]}"} "$@" --nodes "${NNODES:-1}" \
    --gpus-per-node "$NPROC" --gpu-memory-gib "${GPU_MEM_GIB:-80}"
fi
# On a scheduler's SIGTERM (or SIGINT, SIGUSR1) torchrun forwards the signal to the ranks, which stop at their next
# safe point with a checkpoint within run.preempt_grace_s (pipeline/preempt.py), and SIGKILLs them after its
# --shutdown-timeout (30 s by default, shorter than the 60 s grace): give them the grace and 30 s to exit. Without
# SIGUSR1 in --signals-to-handle, a SIGUSR1 ends torchrun and leaves the ranks running.
GRACE_S=$(python3 -c 'import math, sys
from pipeline.config import load_config
print(math.ceil(load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")]).run.preempt_grace_s))' \
  "$CONFIG" "$@")
exec torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --shutdown-timeout $((GRACE_S + 30)) --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  -m pipeline run "$CONFIG" ${LAYOUT[@]+"${LAYOUT[@]}"} "$@"
