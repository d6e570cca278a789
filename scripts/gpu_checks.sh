#!/usr/bin/env bash
# One GPU session's checks, in one command (device time is scarce): every GPU test
# (python -m pytest -m gpu: the backend case list on cuDNN and Triton, the greedy-grouping
# kernel, grouping="lowrank"), then the grouping cost and the lowrank pre-pass cost.
# Results under $OUT (or benchmarks/results). Usage on a GPU machine, from the repository
# root:
#   PYTHONPATH=. bash scripts/gpu_checks.sh [tests|grouping|lowrank|all]
set -uo pipefail
out="${OUT:-benchmarks/results}"
what="${1:-all}"
export PYTHONUNBUFFERED=1
if [ "$what" = tests ] || [ "$what" = all ]; then
  # pytest-xdist (on the GPU image) compiles in parallel: the whole suite took 482 s with
  # 6 workers on an H100 (2026-11-25); the Mosaic compiles dominate.
  workers=$(python -c "import xdist" 2>/dev/null && echo "-n 6" || echo "")
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 560 python -m pytest -q -m gpu $workers \
    -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -15
fi
if [ "$what" = grouping ] || [ "$what" = all ]; then
  timeout 240 python -m benchmarks.grouping_cost --d 128 64 --block-q 16 64 1024 0 \
    --out-dir "$out" 2>&1 | grep -v Warn | tail -26
fi
if [ "$what" = lowrank ] || [ "$what" = all ]; then
  timeout 170 python -m benchmarks.lowrank_cost --out-dir "$out" 2>&1 | grep -v Warn | tail -30
fi
