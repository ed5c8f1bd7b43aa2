#!/usr/bin/env bash
# Download the wheels the GPU machines need but cannot fetch (no internet there) into ./.whl.
# Run from the repository root on a machine with PyPI access; /.whl/ is git-ignored via
# .git/info/exclude. On the GPU machine:
#   python3 -m pip install --no-deps .whl/megatron_core-0.19.2-*.whl
# megatron-core 0.19.2 needs only torch, numpy and packaging (present there) and imports triton
# (present there with torch). The wheel is cp312 manylinux_2_24/2_28: the GPU machines run
# Python 3.12, so the platform tags below select it whatever this machine's Python is.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl megatron-core==0.19.2
ls -l .whl
