#!/usr/bin/env bash
# The one launcher behind every job script: starts tsdkd-train with torchrun on every node.
#
#   slurm/launch.sh <config.yaml> [key=value ...]
#
# Inside a Slurm allocation (sbatch, salloc) it runs `srun` with one task per node; each task starts one torchrun
# that joins a c10d rendezvous on the first node of $SLURM_JOB_NODELIST. Outside Slurm it starts one torchrun on this
# machine (--standalone), so a config can be tried before it is queued.
#
# Before anything starts, the launcher runs `tsdkd-train --dry-run` once (in the batch shell under Slurm, before
# srun) for the world the job will have: a config or input error ends the job with its one `error: ...` line and
# exit code 2, instead of the same line buried in every rank's traceback and torchrun's ChildFailedError dump.
# Then, on every node before its torchrun, `tsdkd-doctor --quiet` checks what the node has (torch's CUDA build
# against the driver, NCCL, GPUs against NPROC_PER_NODE, megatron-core and vLLM against their pins, disk for
# checkpoints): a bad node ends the job with one `error: <node>: ...` line per problem and exit code 1.
#
# Signals: wherever SIGTERM, SIGINT or SIGUSR1 lands (this launcher, srun, torchrun, the workers; Slurm signals
# every process of a step, Ctrl-C the foreground process group), the trainer saves one checkpoint at the end of its
# current step and exits 0; torchrun, srun and the launcher exit 0 after it. What each level does:
#   - the launcher (batch shell, and each node's task) traps them and passes them on to torchrun, or to the job's
#     steps (TERM/INT through `scancel --signal`: srun would abort the step on TERM; USR1 to srun, which forwards
#     it), as soon as that process has its own handler installed (read off /proc), so an early signal is not lost;
#   - torchrun is started through megatron_tsdkd/runtime/torchrun.py, which passes them on to each worker instead of
#     torchrun's own shutdown (os.killpg of every worker's process group, SIGKILL 30 s later, exit 1) and keeps
#     supervising; until its handlers are installed it ignores them, so it cannot die of one while importing;
#   - the workers: engines/preemption.py records the signal, engines/checkpoint.py writes with no helper process
#     a signal could kill, and runtime/parent_watch.py kills a worker whose torchrun is gone (kill -9), so nothing
#     trains on unsupervised;
#   - the node log's tee ignores them, so the workers' last lines are not lost to a broken pipe.
# A plain `scancel` is SIGTERM then, KillWait seconds later, SIGKILL: a save that cannot finish in that time is left
# as step_N.partial, never used, and `latest` still names the previous checkpoint.
# USR1 is Slurm's warning before the time limit (`--signal=B:USR1@<grace>` in the job scripts warns this batch
# shell; `scancel --signal=USR1 <job>` the whole step, which leaves a marker so the launcher still knows): after the
# clean stop the launcher requeues the job (`scontrol requeue`) and the next run resumes (checkpoint.resume=auto).
# SIGTERM and SIGINT (scancel, preemption, Ctrl-C) never requeue: Slurm requeues preempted jobs itself.
#
# Environment (all optional):
#   NPROC_PER_NODE      processes per node (default: GPUs on the node, else 1)
#   MASTER_PORT         rendezvous port on the first node (default: 20000 + job id mod 20000; any free port locally)
#   TSDKD_HOME          repository root (default: the folder above this script)
#   TSDKD_PYTHON        python with megatron_tsdkd installed (default: $TSDKD_HOME/.venv/bin/python, else python3)
#   TSDKD_TRAIN_CMD     training command, config and overrides appended (default: "$TSDKD_PYTHON -m megatron_tsdkd.cli train")
#   TSDKD_DRY_RUN       1: run the dry run first, 0: skip it (default: 1 unless TSDKD_TRAIN_CMD is set)
#   TSDKD_DOCTOR        1: run tsdkd-doctor on each node first, 0: skip it (default: as TSDKD_DRY_RUN)
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

procs_per_node() {
    local nproc=${NPROC_PER_NODE:-}
    if [[ -z $nproc ]]; then nproc=$(gpus_on_node); ((nproc > 0)) || nproc=1; fi
    echo "$nproc"
}

# ---------------------------------------------------------------------------------------------------------------
# Signals: a trap only records the signal (STOP_SIGNAL, PENDING); wait_for passes it on to the child.

STOP_SIGNAL=""
PENDING=()
on_signal() {
    STOP_SIGNAL=$1
    PENDING+=("$1")
    [[ -z ${MARKER_DIR:-} ]] || touch "$MARKER_DIR/$1-received.restart-${SLURM_RESTART_COUNT:-0}"
    say "$1: asking training to save a checkpoint and stop"
}
trap_stop_signals() { trap 'on_signal TERM' TERM; trap 'on_signal INT' INT; trap 'on_signal USR1' USR1; }

# Whether process $1 takes signal $2 (a name) now: a handler installed, or blocked to be taken later (srun waits for
# its signals in a thread). False while it ignores it or would die of it; true where /proc cannot tell.
takes() {
    local key value number caught=0
    number=$(kill -l "$2") || return 0
    [[ -r /proc/$1/status ]] || return 0
    while read -r key value; do
        if [[ $key == SigCgt: || $key == SigBlk: ]]; then ((caught |= (16#$value >> (number - 1)) & 1)); fi
    done <"/proc/$1/status"
    ((caught))
}

# Signal $1 to pid $2. srun would turn SIGTERM into an abort of the step (SIGKILL KillWait + 2 s later) and only
# report SIGINT; so these go to the job's steps through scancel, as `scancel --signal=TERM <job>` sends them.
SRUN_PID=""
pass_on() {
    if [[ $2 == "$SRUN_PID" && $1 != USR1 ]] && scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null; then return 0; fi
    kill "-$1" "$2" 2>/dev/null || true
}

# Wait for pid $1 to exit and set WAIT_RC to its status. Signals trapped meanwhile are passed on to it once it
# handles them (`wait` returns early, status > 128, whenever a trapped signal arrives: keep waiting while it lives).
wait_for() {
    local pid=$1
    while true; do
        while ((${#PENDING[@]} > 0)) && kill -0 "$pid" 2>/dev/null; do
            if takes "$pid" "${PENDING[0]}"; then
                pass_on "${PENDING[0]}" "$pid"
                PENDING=("${PENDING[@]:1}")
            else
                sleep 0.2 & wait $! || true   # still starting up (signals ignored until its handler is in place)
            fi
        done
        WAIT_RC=0
        wait "$pid" || WAIT_RC=$?
        kill -0 "$pid" 2>/dev/null || return 0
    done
}

# ---------------------------------------------------------------------------------------------------------------
# The dry run: `tsdkd-train --dry-run` for a world of $1 processes, config and overrides after it. Exit 0 or 2
# with its one `error:` line; nothing is started.
dry_run() {
    local world=$1
    shift
    local mode=${TSDKD_DRY_RUN:-}
    [[ -n $mode ]] || { [[ -n ${TSDKD_TRAIN_CMD:-} ]] && mode=0 || mode=1; }
    [[ $mode == 0 ]] && return 0
    local out=$TSDKD_RUN_LOG_DIR/dry-run.log err rc=0
    err=$(WORLD_SIZE=$world LOCAL_WORLD_SIZE=$(procs_per_node) "$TSDKD_PYTHON" -m megatron_tsdkd.cli train --dry-run \
        "$@" 2>&1 >"$out") || rc=$?
    if ((rc == 0)); then
        say "dry run: the config, the inputs and the memory plan for $world processes are fine ($out)"
        return 0
    fi
    if ((rc == 2)) && grep -q '^error: ' <<<"$err"; then
        grep -m 1 '^error: ' <<<"$err" >&2
        exit 2
    fi
    echo "launch.sh: error: the dry run failed (exit $rc); its last lines (all of them in $out):" >&2
    tail -n 20 "$out" >&2
    [[ -z $err ]] || tail -n 20 <<<"$err" >&2
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------------------------
# The node check: `tsdkd-doctor --quiet` for $1 processes on this node, config and overrides after it. Returns 0,
# or prints its blocking findings (one `error: <node>: ...` line each) and exits 1. Under Slurm the lines go to a
# marker file that run_allocation prints once, instead of every node's log. A stop signal during the check is
# recorded by the caller's trap and ends the node without training (run_node).
doctor() {
    local nproc=$1
    shift
    local mode=${TSDKD_DOCTOR:-${TSDKD_DRY_RUN:-}}
    [[ -n $mode ]] || { [[ -n ${TSDKD_TRAIN_CMD:-} ]] && mode=0 || mode=1; }
    [[ $mode == 0 ]] && return 0
    local node=${SLURMD_NODENAME:-$(hostname -s)} out rc=0 lines
    out=$("$TSDKD_PYTHON" -m megatron_tsdkd.commands.doctor --quiet --nproc-per-node "$nproc" "$@" 2>&1) || rc=$?
    ((rc == 0)) || [[ -n $STOP_SIGNAL ]] && return 0   # a stop signal (trapped here) may have ended the check
    if ((rc == 1)) && grep -q '^error: ' <<<"$out"; then
        lines=$(grep '^error: ' <<<"$out")
    else
        lines="error: $node: tsdkd-doctor failed (exit $rc): $(tail -n 1 <<<"$out")"
    fi
    if [[ ${TSDKD_LAUNCH_ROLE:-} == node ]]; then
        echo "$lines" >"$TSDKD_RUN_LOG_DIR/doctor-$node.restart-${SLURM_RESTART_COUNT:-0}.failed"
    else
        echo "$lines" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------------------------------------------------------
# One node: torchrun (through runtime/torchrun.py, see the header); signals that reach this task are passed on.
run_node() {
    local nproc
    nproc=$(procs_per_node)
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

    # A signal may come straight to the step (`--signal=USR1@...` without B:, `scancel --signal=USR1|TERM <job>`),
    # bypassing the batch shell: leave a marker so that the launcher still knows (and requeues after USR1).
    MARKER_DIR=$TSDKD_RUN_LOG_DIR
    trap_stop_signals
    doctor "$nproc" "$@"
    if [[ -n $STOP_SIGNAL ]]; then   # during the node check: nothing trained yet, so nothing to save
        trap - USR1 TERM INT
        say "$STOP_SIGNAL on node $node before training started: not starting it"
        return 0
    fi
    echo "=== $(date -Is) node $node: $nproc processes, restart ${SLURM_RESTART_COUNT:-0} ===" >>"$log"
    # Each node's output goes to its own log and to srun, which labels it with the node index in the job's output.
    (
        trap '' TERM INT USR1   # until runtime/torchrun.py installs its handlers; the workers get the defaults
        exec "$TSDKD_PYTHON" -m megatron_tsdkd.runtime.torchrun "${rendezvous[@]}" --nproc_per_node="$nproc" \
            --max_restarts=0 --no_python "${train_cmd[@]}" "$@"
    ) > >(trap '' TERM INT USR1; exec tee -a "$log") 2>&1 &
    local torchrun=$!
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
    dry_run $((nodes * $(procs_per_node))) "$@"
    export TSDKD_LAUNCH_ROLE=node TSDKD_NNODES=$nodes TSDKD_RDZV_ENDPOINT=$head:$port TSDKD_RDZV_ID=$SLURM_JOB_ID
    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s), rendezvous $head:$port," \
        "logs in $TSDKD_RUN_LOG_DIR"

    trap_stop_signals
    # --cpus-per-task: without it a step task may be bound to one core, and torchrun's workers with it.
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        --kill-on-bad-exit=1 --label "$LAUNCHER" "$@" &
    SRUN_PID=$!
    wait_for "$SRUN_PID"
    local rc=$WAIT_RC
    trap - USR1 TERM INT

    local failed=("$TSDKD_RUN_LOG_DIR"/doctor-*.restart-"${SLURM_RESTART_COUNT:-0}".failed)
    if ((rc != 0)) && [[ -e ${failed[0]} ]]; then   # a node's check failed: its lines, not every node's log
        cat "${failed[@]}" >&2
        return 1
    fi
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
    local sig
    for sig in USR1 TERM INT; do   # a signal straight to the step left a marker
        [[ -z $STOP_SIGNAL && -e $TSDKD_RUN_LOG_DIR/$sig-received.restart-${SLURM_RESTART_COUNT:-0} ]] && STOP_SIGNAL=$sig
    done
    if [[ $STOP_SIGNAL == USR1 ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} limit=${TSDKD_MAX_REQUEUES:-20}
        if ((restarts >= limit)); then
            say "stopped on USR1 after $restarts restarts (TSDKD_MAX_REQUEUES=$limit): not requeueing"
            return 0
        fi
        say "checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID" || { say "scontrol requeue failed; resubmit the job to resume"; return 1; }
        return 0
    fi
    if [[ -n $STOP_SIGNAL ]]; then
        say "stopped on $STOP_SIGNAL after saving a checkpoint; not requeueing"
        return 0
    fi
    say "training finished"
    return 0
}

# ---------------------------------------------------------------------------------------------------------------
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
    dry_run "$(procs_per_node)" --config "$CONFIG" "$@"
    say "no Slurm allocation: running on this machine, logs in $TSDKD_RUN_LOG_DIR"
    rc=0
    run_node --config "$CONFIG" "$@" || rc=$?
    [[ -z $STOP_SIGNAL ]] || say "stopped on $STOP_SIGNAL (exit code $rc)"
    exit "$rc"
fi
