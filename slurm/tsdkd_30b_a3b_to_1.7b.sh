#!/usr/bin/env bash
# TSD-KD, a mixture-of-experts teacher: Qwen3-30B-A3B (3.3B of 30.5B parameters active per token) -> Qwen3-1.7B
# student, 1 node x 8 GPUs: the student at TP=1, DP=8; the teacher on its own layout at TP=1 x PP=1 with its 128
# experts split over the node (parallel.teacher.expert=8, 16 experts per GPU), a teacher replica beside each student
# replica (configs/tsdkd_30b_a3b_to_1.7b.yaml says why this layout of those `tsdkd-plan --search` lists for
# 8 x 80 GB); hyperparameters of the reference run.
#
#   mkdir -p logs && sbatch slurm/tsdkd_30b_a3b_to_1.7b.sh [key=value ...]      # submit from the repository root
#
# Paths come from the environment (defaults in brackets, relative to the repository root):
#   TEACHER_MODEL  [models/Qwen3-30B-A3B]   Hugging Face folder of the teacher
#   STUDENT_MODEL  [models/Qwen3-1.7B]   Hugging Face folder of the student
#   TRAIN_DATA     [data/ultrainteract_sft.jsonl]   JSONL prompts (messages | prompt/response)
#   OUTPUT_DIR     [outputs/<config name>, e.g. outputs/tsdkd_30b_a3b_to_1.7b]
#                  checkpoints/, tensorboard/ and per-node logs
#   TSDKD_CONFIG   [configs/tsdkd_30b_a3b_to_1.7b.yaml]   training config; key=value arguments override it
# Check the memory plan before queueing: python tools/plan.py --config configs/tsdkd_30b_a3b_to_1.7b.yaml --world-size 8
#   (add --search for every layout that fits)
# Try the launch path without Slurm: NPROC_PER_NODE=1 slurm/tsdkd_30b_a3b_to_1.7b.sh parallel.teacher.expert=1 ...
#
# Preemption and time limits: Slurm sends USR1 to this script 300 s before the limit (--signal); the launcher
# passes it to the trainer, which saves a checkpoint and exits, and the job requeues itself and resumes
# (checkpoint.resume=auto). `scancel --batch --signal=USR1 <job>` does the same by hand.
#SBATCH --job-name=tsdkd-30b-a3b-1.7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

# Under sbatch this file runs from Slurm's spool folder, so the repository is where the job was submitted.
TSDKD_HOME=${TSDKD_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/pair_job.sh
source "$TSDKD_HOME/slurm/pair_job.sh" "tsdkd_30b_a3b_to_1.7b.sh" models/Qwen3-30B-A3B models/Qwen3-1.7B \
    configs/tsdkd_30b_a3b_to_1.7b.yaml "$@"
