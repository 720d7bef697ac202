#!/usr/bin/env bash
# The device check for a lent GPU, in one run: what it runs on, tests/gpu, then the step benchmark at bf16 on the
# three realistic workloads through ZSAMTrainer and through the optimizer (eager, and captured: one CUDA graph a step).
#
#   bash scripts/gpu_wheels.sh                  # here first: the wheels the GPU image lacks, into .whl/
#   bash scripts/check_gpu.sh [OUTPUT_DIR]      # there: default $OUT (the device tool's), else build/gpu-check
#
# It runs from the checkout without installing it (the image has no package index): the checkout goes first on
# PYTHONPATH, after the carried wheels of .whl/, installed beside the image's packages. The environment report
# (scripts/gpu_environment.py) comes first and stops the check where zsam_hf does not import or no GPU is visible,
# before the lease is spent on parts that cannot run. After it every part runs, each within its own time limit,
# even if an earlier one fails; the exit status is the first failure's. Record the outputs in docs/ with the card
# named (environment.txt). It writes seven files, within the eight the device tool brings back from $OUT.
#
# ZSAM_CHECK_REHEARSAL=1 runs the same parts with the same flags on the CPU, on a tiny workload, in seconds: the
# rehearsal a test runs (tests/benchmark/test_gpu_check.py), so the script works the first time a GPU is lent.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-build/gpu-check}}
mkdir -p "$out"
python=${PYTHON:-python3}
wheels=${ZSAM_CHECK_WHEELS:-.whl}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${ZSAM_CHECK_REHEARSAL:-0}" = 1 ]; then
    device=cpu workloads="resnet10t@16x2" sizes="--steps 1 --rounds 1 --warmup 1"
else
    device=cuda workloads="resnet18@32x64 resnet50@224x64 vit_base_patch16_224@224x64"
    sizes="--steps 25 --rounds 4 --warmup 5"  # 100 timed calls a row: short GPU steps are noisy
fi
status=0
run() {  # run NAME SECONDS COMMAND...: its output to the terminal and to OUTPUT_DIR/NAME.txt, stopped at SECONDS
    local name=$1 seconds=$2
    shift 2
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "$name: stopped after $seconds s" | tee -a "$out/$name.txt"; fi
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

site_args=()
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        || { echo "could not install the carried wheels of $wheels" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    site_args=(--site "$site")
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run environment 120 "$python" scripts/gpu_environment.py --device "$device" ${site_args[@]+"${site_args[@]}"}
[ "$status" -eq 0 ] || exit "$status"
if [ "$device" = cuda ]; then
    run card 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
run tests_gpu 240 "$python" -m pytest tests/gpu -q -p no:cacheprovider
# shellcheck disable=SC2086  # the workloads and sizes are separate arguments
run step_trainer 180 "$python" scripts/benchmark_step.py --device "$device" --bf16 --workloads $workloads \
    $sizes --intervals --no_released --json "$out/step_trainer.json"
# shellcheck disable=SC2086
run step_optimizer 240 "$python" scripts/benchmark_step.py --mode optimizer --captured --device "$device" --bf16 \
    --workloads $workloads $sizes --json "$out/step_optimizer.json"
exit "$status"
