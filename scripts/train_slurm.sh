#!/usr/bin/env bash
# Multi-node training under Slurm: one process per node, each driving all of its GPUs.
#
#   sbatch --nodes=4 scripts/train_slurm.sh --even /shared/even --odd /shared/odd \
#          --out /shared/runs/mydata --batch-size 16
#
# The run directory and the data must be on a filesystem every node sees. JAX reads the node
# list, process count and process id from Slurm (jax.distributed.initialize auto-detection);
# process 0's node is the coordinator. --batch-size is GLOBAL and must be a multiple of the
# total GPU count (nodes x GPUs per node). On SIGTERM (preemption, time limit; see --signal)
# every process saves a checkpoint at the same step; --requeue restarts the job, which
# resumes from it.
#
#SBATCH --job-name=cryoden-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=cryoden-train-%j.log
set -euo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
srun --kill-on-bad-exit=1 "${PYTHON:-python}" -m cryoden.train --distributed on "$@"
