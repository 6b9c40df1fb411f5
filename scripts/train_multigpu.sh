#!/usr/bin/env bash
# Train on every GPU of one machine: one process drives all local GPUs (data-parallel).
#
#   scripts/train_multigpu.sh --even even/ --odd odd/ --out runs/mydata [any cryoden.train flag]
#   GPUS=0,1 scripts/train_multigpu.sh ...         # a subset of the GPUs
#
# --batch-size is the GLOBAL batch: it must be a multiple of the number of GPUs (the paper's
# 2D recipe, batch 4, fits 1, 2 or 4 GPUs; use --batch-size 8 on 8 GPUs). Running the same
# command again resumes from the newest checkpoint in --out.
set -euo pipefail
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
# Let JAX grow GPU memory as needed instead of reserving 75% of each GPU up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "${PYTHON:-python}" -m cryoden.train --distributed off "$@"
