#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels that the lent GPU machine's image lacks, for its Python 3.12, into .whl/
# (ignored by git; the device tool carries it). Versions are those requirements.txt resolves to on Python 3.11.
#   bash benchmarks/gpu_wheels.sh          then run with carry [".whl"] and, first in the device command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Not carried: SGLang (several GB), DeepSpeed (source only on PyPI; the smoke check does not use it), torch (the
# image's own CUDA build is used and its version recorded with the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  nltk==3.10.4 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 -m pip wheel -q --no-deps -w .whl rouge_score==0.1.2  # published as a source archive only; pure Python
du -sh .whl && ls .whl
