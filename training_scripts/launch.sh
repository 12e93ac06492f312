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
exec torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m pipeline run "$CONFIG" ${LAYOUT[@]+"${LAYOUT[@]}"} "$@"
