#!/usr/bin/env bash
# TSD-KD: Qwen2.5-72B-Instruct teacher -> Qwen2.5-7B-Instruct student, 2 nodes x 8 GPUs: the student at TP=2, DP=8
# (eight replicas), the teacher on its own layout at TP=8 x PP=2 (one replica, a pipeline stage per node), the best
# layout `tsdkd-plan --search` lists for 16 x 80 GB. The teacher's layout needs a multiple of 16 processes, 8 per node.
# The Llama-3.1-70B -> 8B variant (the same layout): TSDKD_CONFIG=configs/tsdkd_llama70b_to_8b.yaml with
# TEACHER_MODEL/STUDENT_MODEL set.
#
#   mkdir -p logs && sbatch slurm/tsdkd_70b_to_7b.sh [key=value ...]      # submit from the repository root
#
# Paths come from the environment (defaults in brackets, relative to the repository root):
#   TEACHER_MODEL  [models/Qwen2.5-72B-Instruct]   Hugging Face folder of the teacher
#   STUDENT_MODEL  [models/Qwen2.5-7B-Instruct]   Hugging Face folder of the student
#   TRAIN_DATA     [data/ultrainteract_sft.jsonl]   JSONL prompts (messages | prompt/response)
#   OUTPUT_DIR     [outputs/<config name>, e.g. outputs/tsdkd_70b_to_7b]
#                  checkpoints/, tensorboard/ and per-node logs
#   TSDKD_CONFIG   [configs/tsdkd_70b_to_7b.yaml]   training config; key=value arguments override it
# Check the memory plan before queueing: python tools/plan.py --config configs/tsdkd_70b_to_7b.yaml --world-size 16
#   (add --search for every layout that fits)
# Try the launch path without Slurm: NPROC_PER_NODE=1 slurm/tsdkd_70b_to_7b.sh parallel.tensor=1 \
#   parallel.teacher.tensor=1 parallel.teacher.pipeline=1 ...
#
# Preemption and time limits: Slurm sends USR1 to this script 600 s before the limit (--signal); the launcher
# passes it to the trainer, which saves a checkpoint and exits, and the job requeues itself and resumes
# (checkpoint.resume=auto). `scancel --batch --signal=USR1 <job>` does the same by hand.
#SBATCH --job-name=tsdkd-72b-7b
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
source "$TSDKD_HOME/slurm/pair_job.sh" "tsdkd_70b_to_7b.sh" models/Qwen2.5-72B-Instruct models/Qwen2.5-7B-Instruct \
    configs/tsdkd_70b_to_7b.yaml "$@"
