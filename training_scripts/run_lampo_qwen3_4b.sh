#!/usr/bin/env bash
# LamPO RL on Qwen3-4B on one 8-GPU node: Megatron-core training (TP 2 x PP 1 x DP 4 in the config), SGLang
# rollouts on DeepScaleR-Preview problems, then evaluation on MATH-500, AIME24/25 and GPQA-Diamond. Rerun to resume.
#   bash training_scripts/run_lampo_qwen3_4b.sh [key=value ...]
# The layout (backend.tensor_parallel / pipeline_parallel) comes from configs/qwen3_4b.yaml alone; TP=... and PP=...
# override it only when set. NPROC: processes (GPUs) per node, default 8. Multi-node: set NNODES, NODE_RANK and
# MASTER_ADDR as torchrun expects.
#   DRY_RUN=1 bash training_scripts/run_lampo_qwen3_4b.sh [key=value ...]   prints the layout and per-GPU memory plan
#   (python -m pipeline plan; GPU_MEM_GIB=80 by default) instead of launching, and exits 2 if it cannot work.
# Environment (NPROC, NNODES, TP, PP, DRY_RUN, ...): see training_scripts/launch.sh.
exec bash "$(dirname "$0")/launch.sh" configs/qwen3_4b.yaml "$@"
