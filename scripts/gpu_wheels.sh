#!/usr/bin/env bash
# Fetch the wheels that scripts/gpu_check.sh needs on an offline GPU machine whose image already
# holds JAX with CUDA, flax, optax, orbax, tifffile and matplotlib (Python 3.12, x86-64), into
# ./.whl (ignored by git). Run it here, with internet (or a package index), before carrying
# .whl to the GPU machine; gpu_check.sh installs them with `pip install --no-index --target`.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
#
# Only small pure or manylinux wheels: mrcfile (MRC I/O), grain + array-record + portpicker
# (training data pipeline and checkpoints). imagecodecs (28 MB; LZW/EER TIFF) and topaz-em
# (48 MB; reference tests) are left out to keep the carried tree under 64 MiB: the tests that
# gpu_check.sh runs need neither.
set -eu
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "mrcfile>=1.5" "grain>=0.2.12" array-record portpicker
ls -l .whl
du -sh .whl
