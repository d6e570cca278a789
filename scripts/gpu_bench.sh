#!/usr/bin/env bash
# Speed runs on a GPU machine, split so each fits one 10-minute device command.
#   PYTHONPATH=. bash scripts/gpu_bench.sh A   # greedy GPU test, grouping cost, d=64/256 speed
#   PYTHONPATH=. bash scripts/gpu_bench.sh C   # only the d=64/256 speed part of A
#   PYTHONPATH=. bash scripts/gpu_bench.sh B   # d=128 speed at N=4096/16384, causal off/on
#   PYTHONPATH=. bash scripts/gpu_bench.sh M   # the mosaic backend vs cuDNN end to end
#                                              # (d=128/256, N=16384; N=4096) + lowrank cost
#   PYTHONPATH=. bash scripts/gpu_bench.sh T1  # issue 13's table, N=16384, d=128: cuDNN,
#                                              # tokamax, our kernels (G=1, greedy and
#                                              # lowrank G=2/4/8), causal off/on (~6 min)
#   PYTHONPATH=. bash scripts/gpu_bench.sh T2  # the same at N=4096 and 32768, non-causal
# tokamax is timed when importable: carry its wheels in .whl/ (`carry: [".whl"]`; tokamax
# 0.0.17 and what the device image lacks: einshape, pydantic(-core), annotated-types,
# typing-inspection, qwix, immutabledict, tensorboardx, xprof, fire, termcolor, gviz-api;
# downloaded 2026-12-06 with the device notes' pip flags, import checked on a CPU).
set -uo pipefail
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
case "${1:-A}" in
  A)
    timeout 100 python -m pytest -q "tests/test_pallas_gpu.py::test_greedy_kernel_equals_xla_loop" 2>&1 | tail -3
    timeout 200 python -m benchmarks.grouping_cost --d 128 64 --block-q 16 64 1024 0 \
      --out-dir "$out" 2>&1 | grep -v Warn | tail -25
    ;&
  C)
    timeout 540 python -m benchmarks.speed --n 16384 --d 64 256 --groups 2 4 8 --causal 0 \
      --reps 10 --min-time 0.2 --tag=-d64-d256 --out-dir "$out" 2>&1 | grep -v "^wrote" ;;
  M)
    mosaic="mosaic G=1,mosaic-distr G=2 bq=N,mosaic-distr G=4 bq=N,mosaic-distr G=8 bq=N"
    mosaic="$mosaic,mosaic-lowrank G=4 bq=N,mosaic-distr G=4 bq=1024,cudnn-distr G=4 bq=N"
    for causal in 0 1; do
      timeout 160 python -m benchmarks.speed --n 16384 --d 128 --groups 2 4 8 --causal $causal \
        --exact --only "cudnn,$mosaic" --reps 10 --min-time 0.2 \
        --tag=-mosaic-d128-c$causal --out-dir "$out" 2>&1 | grep -v "^wrote"
    done
    timeout 90 python -m benchmarks.speed --n 16384 --d 256 --groups 4 8 --causal 0 --exact \
      --only "cudnn,mosaic-distr G=4 bq=N,mosaic-distr G=8 bq=N,mosaic-lowrank G=4 bq=N" \
      --reps 10 --min-time 0.2 --tag=-mosaic-d256 --out-dir "$out" 2>&1 | grep -v "^wrote"
    timeout 55 python -m benchmarks.speed --n 4096 --d 128 --groups 4 --causal 0 --exact \
      --only "cudnn,mosaic-distr G=4 bq=N,mosaic-lowrank G=4 bq=N" --reps 10 --min-time 0.2 \
      --tag=-mosaic-n4096 --out-dir "$out" 2>&1 | grep -v "^wrote"
    timeout 60 python -m benchmarks.lowrank_cost --d 64 128 256 --groups 4 --out-dir "$out" \
      2>&1 | grep -v Warn | tail -12 ;;
  T1|T2)
    ours="mosaic G=1,mosaic-distr G=2 bq=N,mosaic-distr G=4 bq=N,mosaic-distr G=8 bq=N"
    ours="$ours,mosaic-lowrank G=2 bq=N,mosaic-lowrank G=4 bq=N,mosaic-lowrank G=8 bq=N"
    if [ "$1" = T1 ]; then runs="16384:0 16384:1"; else runs="4096:0 32768:0"; fi
    for run in $runs; do
      n=${run%:*}; causal=${run#*:}
      timeout 270 python -m benchmarks.speed --n "$n" --d 128 --groups 2 4 8 --causal "$causal" \
        --exact --only "cudnn,tokamax mosaic,$ours" --reps 10 --min-time 0.2 \
        --tag=-issue13-n$n-c$causal --out-dir "$out" 2>&1 | grep -v "^wrote"
    done ;;
  B)
    timeout 560 python -m benchmarks.speed --n 4096 16384 --d 128 --groups 2 4 8 \
      --causal 0 1 --reps 10 --min-time 0.2 --tag=-d128 --out-dir "$out" 2>&1 | grep -v "^wrote" ;;
esac
