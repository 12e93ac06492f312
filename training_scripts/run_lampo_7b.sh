#!/usr/bin/env bash
# LamPO RL on a 7B model on one 8-GPU node: Megatron-core training (tensor x pipeline x data parallel) with SGLang
# rollouts, then evaluation on MATH-500, AIME24/25 and GPQA-Diamond. Rerun the same command to resume.
#   NPROC=8 TP=4 PP=1 bash training_scripts/run_lampo_7b.sh [key=value ...]
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR as torchrun expects.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}
TP=${TP:-4}
PP=${PP:-1}
exec torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m pipeline run configs/lampo_7b.yaml backend.tensor_parallel="$TP" backend.pipeline_parallel="$PP" "$@"
