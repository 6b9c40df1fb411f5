#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every TPU VM worker (one process
# per host); JAX finds the other hosts itself.
#
#   TPU=my-v4-32 ZONE=us-central2-b scripts/train_tpu_pod.sh \
#       --even /mnt/shared/even --odd /mnt/shared/odd --out /mnt/shared/runs/mydata \
#       --batch-size 32 --dtype bfloat16
#
# Prerequisites on every worker: cryoden installed with jax[tpu] (same versions everywhere),
# and the data and run directory on storage all workers share (Filestore/NFS, or a bucket
# mounted with gcsfuse at the same path). --batch-size is GLOBAL: a multiple of the number
# of TPU chips/cores (jax.device_count()). Re-running the command resumes the run.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd \"${REMOTE_DIR:-\$HOME}\" && ${PYTHON:-python3} -m cryoden.train --distributed on${args}"
