#!/usr/bin/env bash
# The CPU demo through the same launcher as the GPU jobs: a tiny teacher and student, 2 gloo processes per node.
#
#   sbatch slurm/demo_cpu.sh [key=value ...]        # on a Slurm cluster, submitted from the repository root
#   slurm/demo_cpu.sh [key=value ...]               # on a laptop, no Slurm needed
#
# Overrides go to the trainer, e.g. `sbatch slurm/demo_cpu.sh schedule.max_steps=5`. A multi-node try:
# `sbatch --nodes=2 slurm/demo_cpu.sh`.
#SBATCH --job-name=tsdkd-demo-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --output=tsdkd-demo-cpu-%j.out
#SBATCH --error=tsdkd-demo-cpu-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
set -euo pipefail

# Under sbatch this file runs from Slurm's spool folder, so the repository is where the job was submitted.
TSDKD_HOME=${TSDKD_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/job_home.sh
source "$TSDKD_HOME/slurm/job_home.sh" "demo_cpu.sh"

CONFIG=${TSDKD_CONFIG:-configs/demo_cpu.yaml}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export CUDA_VISIBLE_DEVICES=""               # the CPU demo stays on the CPU even on a GPU node (gloo backend)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # several processes share a few cores

exec "$TSDKD_HOME/slurm/launch.sh" "$CONFIG" "$@"
