# shellcheck shell=bash
# The body every teacher -> student job script shares, sourced last by it (after it set TSDKD_HOME):
#   source "$TSDKD_HOME/slurm/pair_job.sh" SCRIPT_NAME DEFAULT_TEACHER DEFAULT_STUDENT DEFAULT_CONFIG "$@"
# The model, data and config paths come from TEACHER_MODEL, STUDENT_MODEL, TRAIN_DATA and TSDKD_CONFIG (else the
# script's defaults) and are checked before any node starts; outputs go under OUTPUT_DIR; then launch.sh runs the
# config with the job's key=value arguments. SCRIPT_NAME names the script in error messages.
name=$1 default_teacher=$2 default_student=$3 default_config=$4
shift 4
# shellcheck source=slurm/job_home.sh
source "$TSDKD_HOME/slurm/job_home.sh" "$name"

TEACHER_MODEL=${TEACHER_MODEL:-$default_teacher}
STUDENT_MODEL=${STUDENT_MODEL:-$default_student}
TRAIN_DATA=${TRAIN_DATA:-data/ultrainteract_sft.jsonl}
CONFIG=${TSDKD_CONFIG:-$default_config}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$(basename "$CONFIG" .yaml)}
for path in "$TEACHER_MODEL" "$STUDENT_MODEL"; do
    [[ -f $path/config.json ]] || { echo "$name: error: $path has no config.json (set TEACHER_MODEL / STUDENT_MODEL)" >&2; exit 2; }
done
[[ -f $TRAIN_DATA ]] || { echo "$name: error: training data $TRAIN_DATA not found (set TRAIN_DATA)" >&2; exit 2; }
export TSDKD_LOG_DIR=${TSDKD_LOG_DIR:-$OUTPUT_DIR/logs}

# shellcheck source=slurm/gpu_env.sh
source "$TSDKD_HOME/slurm/gpu_env.sh"

exec "$TSDKD_HOME/slurm/launch.sh" "$CONFIG" \
    "models.teacher.path=$TEACHER_MODEL" "models.student.path=$STUDENT_MODEL" "data.train=$TRAIN_DATA" \
    "checkpoint.dir=$OUTPUT_DIR/checkpoints" "logging.dir=$OUTPUT_DIR/tensorboard" checkpoint.resume=auto "$@"
