#!/usr/bin/env bash
# TSD-KD: the paper's pair, Qwen2.5-14B-Instruct teacher -> Qwen2.5-1.5B-Instruct student, 1 node x 8 GPUs
# (the student at TP=1, DP=8; the teacher on its own layout at TP=8 over the node, serving all eight student
# replicas: the best layout `tsdkd-plan --search` lists for 8 x 80 GB), hyperparameters of the reference run.
#
#   mkdir -p logs && sbatch slurm/tsdkd_14b_to_1.5b.sh [key=value ...]      # submit from the repository root
#
# Paths come from the environment (defaults in brackets, relative to the repository root):
#   TEACHER_MODEL  [models/Qwen2.5-14B-Instruct]   Hugging Face folder of the teacher
#   STUDENT_MODEL  [models/Qwen2.5-1.5B-Instruct]   Hugging Face folder of the student
#   TRAIN_DATA     [data/ultrainteract_sft.jsonl]   JSONL prompts (messages | prompt/response)
#   OUTPUT_DIR     [outputs/<config name>, e.g. outputs/tsdkd_14b_to_1.5b]
#                  checkpoints/, tensorboard/ and per-node logs
#   TSDKD_CONFIG   [configs/tsdkd_14b_to_1.5b.yaml]   training config; key=value arguments override it
# Check the memory plan before queueing: python tools/plan.py --config configs/tsdkd_14b_to_1.5b.yaml --world-size 8
#   (add --search for every layout that fits)
# Try the launch path without Slurm: NPROC_PER_NODE=1 slurm/tsdkd_14b_to_1.5b.sh parallel.teacher.tensor=1 ...
#
# Preemption and time limits: Slurm sends USR1 to this script 300 s before the limit (--signal); the launcher
# passes it to the trainer, which saves a checkpoint and exits, and the job requeues itself and resumes
# (checkpoint.resume=auto). `scancel --batch --signal=USR1 <job>` does the same by hand.
#SBATCH --job-name=tsdkd-14b-1.5b
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
source "$TSDKD_HOME/slurm/pair_job.sh" "tsdkd_14b_to_1.5b.sh" models/Qwen2.5-14B-Instruct models/Qwen2.5-1.5B-Instruct \
    configs/tsdkd_14b_to_1.5b.yaml "$@"
