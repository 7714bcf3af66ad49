#!/usr/bin/env bash
# The one launcher behind every job script: starts tsdkd-train with torchrun on every node.
#
#   slurm/launch.sh <config.yaml> [key=value ...]
#
# Inside a Slurm allocation (sbatch, salloc) it runs `srun` with one task per node; each task starts one torchrun
# that joins a c10d rendezvous on the first node of $SLURM_JOB_NODELIST. Outside Slurm it starts one torchrun on this
# machine (--standalone), so a config can be tried before it is queued.
#
# Signals. Slurm's `--signal=B:USR1@<grace>` (set by the job scripts) warns the batch shell, which is this launcher,
# before the time limit. The launcher forwards USR1 to srun, srun to every process of the step, and on each node the
# task forwards it to torchrun's workers, whose trainer saves a checkpoint and exits 0. torchrun itself must survive
# USR1: it handles only TERM/INT/HUP/QUIT (and would die of an unhandled USR1, which is fatal by default), so it is
# started with USR1 ignored; the workers inherit "ignored" and the trainer installs its own handler. After a clean
# stop on USR1 the launcher requeues the job (`scontrol requeue`), and the next run resumes (checkpoint.resume=auto).
# SIGTERM (scancel, preemption) is forwarded the same way but never requeues: Slurm requeues preempted jobs itself.
#
# Environment (all optional):
#   NPROC_PER_NODE      processes per node (default: GPUs on the node, else 1)
#   MASTER_PORT         rendezvous port on the first node (default: 20000 + job id mod 20000; any free port locally)
#   TSDKD_HOME          repository root (default: the folder above this script)
#   TSDKD_PYTHON        python with megatron_tsdkd installed (default: $TSDKD_HOME/.venv/bin/python, else python3)
#   TSDKD_TRAIN_CMD     training command, config and overrides appended (default: "$TSDKD_PYTHON -m megatron_tsdkd.cli train")
#   TSDKD_LOG_DIR       per-node logs go to $TSDKD_LOG_DIR/<job id>/node-<node>.log (default: $TSDKD_HOME/logs)
#   TSDKD_MAX_REQUEUES  stop requeueing after this many restarts (default: 20)
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }
say() { echo "launch.sh: $*"; }

TSDKD_HOME=${TSDKD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
LAUNCHER=$TSDKD_HOME/slurm/launch.sh
[[ -f $LAUNCHER ]] || die "TSDKD_HOME=$TSDKD_HOME has no slurm/launch.sh (set TSDKD_HOME to the repository root)"

if [[ -z ${TSDKD_PYTHON:-} ]]; then
    if [[ -x $TSDKD_HOME/.venv/bin/python ]]; then TSDKD_PYTHON=$TSDKD_HOME/.venv/bin/python; else TSDKD_PYTHON=python3; fi
fi
command -v "$TSDKD_PYTHON" >/dev/null || die "TSDKD_PYTHON=$TSDKD_PYTHON is not an executable python"
export TSDKD_HOME TSDKD_PYTHON

gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0
    else echo 0; fi
}

# Wait for pid $1 to exit and set WAIT_RC to its status; `wait` returns early (status > 128) whenever a trapped
# signal arrives, so keep waiting while the process is alive.
wait_for() {
    local pid=$1
    while true; do
        WAIT_RC=0
        wait "$pid" || WAIT_RC=$?
        kill -0 "$pid" 2>/dev/null || return 0
    done
}

# ---------------------------------------------------------------------------------------------------------------
# One node: torchrun with USR1 ignored; signals that reach this task are passed on to the workers.
run_node() {
    local nproc=${NPROC_PER_NODE:-}
    if [[ -z $nproc ]]; then nproc=$(gpus_on_node); ((nproc > 0)) || nproc=1; fi
    local -a rendezvous
    if [[ -n ${TSDKD_RDZV_ENDPOINT:-} ]]; then
        rendezvous=(--nnodes="$TSDKD_NNODES" --rdzv_backend=c10d --rdzv_endpoint="$TSDKD_RDZV_ENDPOINT"
                    --rdzv_id="$TSDKD_RDZV_ID")
    else
        rendezvous=(--standalone --nnodes=1)  # torchrun picks a free local port
    fi
    local -a train_cmd
    read -r -a train_cmd <<<"${TSDKD_TRAIN_CMD:-$TSDKD_PYTHON -m megatron_tsdkd.cli train}"

    local node=${SLURMD_NODENAME:-$(hostname -s)}
    local log=$TSDKD_RUN_LOG_DIR/node-$node.log
    echo "=== $(date -Is) node $node: $nproc processes, restart ${SLURM_RESTART_COUNT:-0} ===" >>"$log"

    export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT  # never USR1: see the header
    trap '' USR1
    # Each node's output goes to its own log and to srun, which labels it with the node index in the job's output.
    "$TSDKD_PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc" --max_restarts=0 \
        --no_python "${train_cmd[@]}" "$@" > >(tee -a "$log") 2>&1 &
    local torchrun=$!
    # USR1 may come straight to the step (`--signal=USR1@...` without B:, `scancel --signal=USR1 <job>`), bypassing
    # the batch shell: leave a marker so the launcher still requeues after the clean stop.
    # shellcheck disable=SC2064  # expand $torchrun and $log now
    trap "touch '$TSDKD_RUN_LOG_DIR/$USR1_MARKER'; pkill -USR1 -P $torchrun || true" USR1
    # shellcheck disable=SC2064
    trap "kill -TERM $torchrun 2>/dev/null || true" TERM INT
    wait_for "$torchrun"
    trap - USR1 TERM INT
    wait  # let tee drain
    return "$WAIT_RC"
}

# ---------------------------------------------------------------------------------------------------------------
# The whole allocation: one srun task per node, then requeue if we were asked to stop by USR1.
run_allocation() {
    command -v srun >/dev/null || die "SLURM_JOB_ID is set but srun is not on PATH"
    local nodes head port
    nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $head ]] || die "cannot resolve the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export TSDKD_LAUNCH_ROLE=node TSDKD_NNODES=$nodes TSDKD_RDZV_ENDPOINT=$head:$port TSDKD_RDZV_ID=$SLURM_JOB_ID
    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s), rendezvous $head:$port," \
        "logs in $TSDKD_RUN_LOG_DIR"

    STOP_SIGNAL=""
    trap 'STOP_SIGNAL=USR1; say "USR1: asking training to checkpoint and stop"; kill -USR1 "$SRUN_PID" 2>/dev/null || true' USR1
    trap 'STOP_SIGNAL=TERM; say "TERM: stopping training"; kill -TERM "$SRUN_PID" 2>/dev/null || true' TERM
    # --cpus-per-task: without it a step task may be bound to one core, and torchrun's workers with it.
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        --kill-on-bad-exit=1 --label "$LAUNCHER" "$@" &
    SRUN_PID=$!
    wait_for "$SRUN_PID"
    local rc=$WAIT_RC
    trap - USR1 TERM

    if ((rc != 0)); then
        say "training failed with exit code $rc; the last lines of each node's log:"
        local log
        for log in "$TSDKD_RUN_LOG_DIR"/node-*.log; do
            [[ -f $log ]] || continue
            echo "----- $log" >&2
            tail -n 20 "$log" >&2
        done
        return "$rc"
    fi
    if [[ $STOP_SIGNAL == USR1 || -e $TSDKD_RUN_LOG_DIR/$USR1_MARKER ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} limit=${TSDKD_MAX_REQUEUES:-20}
        if ((restarts >= limit)); then
            say "stopped on USR1 after $restarts restarts (TSDKD_MAX_REQUEUES=$limit): not requeueing"
            return 0
        fi
        say "checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || { say "scontrol requeue failed; resubmit the job to resume"; return 1; }
        return 0
    fi
    say "training finished"
    return 0
}

# ---------------------------------------------------------------------------------------------------------------
USR1_MARKER=usr1-received.restart-${SLURM_RESTART_COUNT:-0}
if [[ ${TSDKD_LAUNCH_ROLE:-} == node ]]; then
    run_node "$@"
    exit $?
fi

(($# >= 1)) || die "usage: slurm/launch.sh <config.yaml> [key=value ...]"
[[ $1 == *=* ]] && die "the first argument must be the config file, got the override '$1'"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file $CONFIG not found (relative paths are taken from $(pwd))"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export TSDKD_RUN_LOG_DIR=${TSDKD_LOG_DIR:-$TSDKD_HOME/logs}/$SLURM_JOB_ID
else
    TSDKD_RUN_LOG_DIR=${TSDKD_LOG_DIR:-$TSDKD_HOME/logs}/local-$(date +%Y%m%d-%H%M%S)
    export TSDKD_RUN_LOG_DIR
fi
mkdir -p "$TSDKD_RUN_LOG_DIR"

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    run_allocation --config "$CONFIG" "$@"
else
    say "no Slurm allocation: running on this machine, logs in $TSDKD_RUN_LOG_DIR"
    run_node --config "$CONFIG" "$@"
fi
