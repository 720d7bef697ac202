#!/usr/bin/env bash
# The device check for a lent GPU, in one run: the card, tests/gpu, then the step benchmark at bf16 on the three
# realistic workloads through ZSAMTrainer and through the optimizer (eager, and captured: one CUDA graph a step).
#
#   bash scripts/check_gpu.sh [OUTPUT_DIR]      # default: $OUT (the device tool's), else build/gpu-check
#
# Every part runs even if an earlier one fails; the exit status is the first failure's. Record the outputs in
# docs/ with the card named (card.txt).
set -u
out=${1:-${OUT:-build/gpu-check}}
mkdir -p "$out"
status=0
run() {  # run NAME COMMAND...: its output to the terminal and to OUTPUT_DIR/NAME.txt
    local name=$1
    shift
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
workloads="resnet18@32x64 resnet50@224x64 vit_base_patch16_224@224x64"
run card nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run tests_gpu python -m pytest tests/gpu -q -p no:cacheprovider
# shellcheck disable=SC2086  # the workloads are separate arguments
run step_trainer python scripts/benchmark_step.py --device cuda --bf16 --workloads $workloads \
    --steps 10 --rounds 2 --warmup 3 --intervals --no_released --json "$out/step_trainer.json"
# shellcheck disable=SC2086
run step_optimizer python scripts/benchmark_step.py --mode optimizer --captured --device cuda --bf16 \
    --workloads $workloads --steps 10 --rounds 2 --warmup 3 --json "$out/step_optimizer.json"
exit "$status"
