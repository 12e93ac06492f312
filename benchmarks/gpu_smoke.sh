#!/usr/bin/env bash
# The GPU smoke check: every check that needs a GPU, as one run of under 8 minutes on one GPU, writing its figures.
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]         on a CUDA machine (default OUT_DIR: $OUT, else runs/gpu_smoke)
#   DRY_RUN=1 bash benchmarks/gpu_smoke.sh         on a CPU: the same steps with small shapes (CUDA tests skip)
# 1. the Megatron backend's CUDA tests: fp32 parity with the torch backend on one GPU over NCCL, and the bf16 RL step
#    time on a Qwen2.5-0.5B-shaped model (tests/megatron_backend/test_gpu.py);
# 2. one bf16 RL iteration of that shape through the pipeline's pieces with the HF engine: seconds per phase,
#    tokens/s and MFU (benchmarks/gpu_rl_iteration.py) -> OUT_DIR/rl/rl_iteration.json.
# Each step is time-bounded; a failing step does not stop the next, and the exit status says whether all passed.
# On this project's lent GPU machine, whose image lacks megatron-core and others: benchmarks/gpu_wheels.sh first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_smoke}}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$OUT_DIR"
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)"
  if timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"; then
    echo "== $name: ok in $((SECONDS - t0)) s"
  else
    echo "== $name: FAILED after $((SECONDS - t0)) s (log: $OUT_DIR/$name.log)"; status=1
  fi
}
$PY - <<'PY' | tee "$OUT_DIR/environment.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
step megatron_cuda_tests 300 $PY -m pytest -q -s -p no:cacheprovider tests/megatron_backend/test_gpu.py \
  --junitxml "$OUT_DIR/megatron_cuda_tests.xml"
step rl_iteration 240 $PY -m benchmarks.gpu_rl_iteration --out "$OUT_DIR/rl" ${DRY_RUN:+--dry-run}
exit $status
