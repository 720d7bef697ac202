#!/usr/bin/env bash
# Before a device check: download here (where the package index is reachable) the wheels a lent GPU's image lacks,
# into .whl/ (ignored by git), for the device tool to carry; scripts/check_gpu.sh installs them there.
#
#   bash scripts/gpu_wheels.sh            # then: run(command="bash scripts/check_gpu.sh", carry=[".whl"], ...)
#
# The image (docs/development.md, "The GPU check") has torch 2.11 and transformers 5.17 and no pytorch_optimizer;
# zsam-hf states transformers >= 5.20 and the optimizer benchmark has a pytorch_optimizer row. Both are pure-Python
# wheels, pinned to CI's versions (.ci/constraints.txt); torch stays the image's (a CUDA build is gigabytes).
# PYTHON_VERSION is the image's Python (3.12); both wheels are py3-none-any, so any Python takes them.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wanted="transformers pytorch-optimizer"
pins=()
for name in $wanted; do
    pin=$(grep -i "^${name}==" .ci/constraints.txt) || { echo "no pin for $name in .ci/constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$staging" "${pins[@]}"
rm -rf .whl
mkdir -p .whl
mv "$staging"/*.whl .whl/
ls -l .whl
