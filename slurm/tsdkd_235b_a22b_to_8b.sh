#!/usr/bin/env bash
# TSD-KD, a mixture-of-experts teacher: Qwen3-235B-A22B (22B of 235B parameters active per token) -> Qwen3-8B
# student, 2 nodes x 8 GPUs, the fewest that hold it: the student at TP=4, DP=4 (four replicas), the teacher on its
# own layout at TP=4 x PP=2 (a replica per node, serving the node's two student replicas) with its experts split over
# the two replicas (parallel.teacher.expert=2), the best layout `tsdkd-plan --search` lists for 16 x 80 GB
# (configs/tsdkd_235b_a22b_to_8b.yaml says why). The teacher's layout needs a multiple of 16 processes, 8 per node.
#
#   mkdir -p logs && sbatch slurm/tsdkd_235b_a22b_to_8b.sh [key=value ...]      # submit from the repository root
#
# Paths come from the environment (defaults in brackets, relative to the repository root):
#   TEACHER_MODEL  [models/Qwen3-235B-A22B]   Hugging Face folder of the teacher
#   STUDENT_MODEL  [models/Qwen3-8B]   Hugging Face folder of the student
#   TRAIN_DATA     [data/ultrainteract_sft.jsonl]   JSONL prompts (messages | prompt/response)
#   OUTPUT_DIR     [outputs/<config name>, e.g. outputs/tsdkd_235b_a22b_to_8b]
#                  checkpoints/, tensorboard/ and per-node logs
#   TSDKD_CONFIG   [configs/tsdkd_235b_a22b_to_8b.yaml]   training config; key=value arguments override it
# Check the memory plan before queueing:
#   python tools/plan.py --config configs/tsdkd_235b_a22b_to_8b.yaml --world-size 16 (add --search for every layout
#   that fits)
# Try the launch path without Slurm: NPROC_PER_NODE=1 slurm/tsdkd_235b_a22b_to_8b.sh parallel.tensor=1 \
#   parallel.teacher.tensor=1 parallel.teacher.pipeline=1 parallel.teacher.expert=1 ...
#
# Preemption and time limits: Slurm sends USR1 to this script 600 s before the limit (--signal); the launcher
# passes it to the trainer, which saves a checkpoint and exits, and the job requeues itself and resumes
# (checkpoint.resume=auto). `scancel --batch --signal=USR1 <job>` does the same by hand.
#SBATCH --job-name=tsdkd-235b-a22b-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail

# Under sbatch this file runs from Slurm's spool folder, so the repository is where the job was submitted.
TSDKD_HOME=${TSDKD_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/pair_job.sh
source "$TSDKD_HOME/slurm/pair_job.sh" "tsdkd_235b_a22b_to_8b.sh" models/Qwen3-235B-A22B models/Qwen3-8B \
    configs/tsdkd_235b_a22b_to_8b.yaml "$@"
