#!/usr/bin/env bash
# LamPO RL on Phi-4-mini-instruct on one 8-GPU node: DeepSpeed ZeRO-2 over 8 data-parallel processes (Megatron does not
# map its partial rotary embeddings) with SGLang rollouts on DeepScaleR-Preview problems, then evaluation on MATH-500,
# AIME24/25 and GPQA-Diamond. Rerun the same command to resume.
#   bash training_scripts/run_lampo_phi4_mini.sh [key=value ...]
# NPROC: processes (GPUs) per node, default 8. Multi-node: set NNODES, NODE_RANK and MASTER_ADDR as torchrun expects.
#   DRY_RUN=1 bash training_scripts/run_lampo_phi4_mini.sh [key=value ...]   prints the layout and per-GPU memory plan
#   (python -m pipeline plan; GPU_MEM_GIB=80 by default) instead of launching, and exits 2 if it cannot work.
# Environment (NPROC, NNODES, TP, PP, DRY_RUN, ...): see training_scripts/launch.sh.
exec bash "$(dirname "$0")/launch.sh" configs/phi4_mini.yaml "$@"
