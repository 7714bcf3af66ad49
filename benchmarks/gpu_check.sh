#!/usr/bin/env bash
# The one-GPU check: one command, from a clean checkout, on the machine with one GPU (H100 80 GB or H200) that some
# tasks are lent (Python 3.12, torch 2.11 with CUDA 13 preinstalled, no network), within its 8 minutes:
#
#     bash benchmarks/gpu_check.sh             # the device tool: carry [".whl"]; fill .whl/ first (fill_wheels.sh)
#
# At Qwen2.5 widths, heads and vocabularies, random weights, bf16, and a synthetic tokenizer of Qwen2.5's size
# (151,665 tokens, built locally with `tokenizers`; embeddings padded to 152,064 in training), so our losses and
# sampling run over ~152k columns; the models: the Qwen2.5-1.5B student at full depth (28 layers), a Qwen2.5-7B-wide
# teacher of GPU_CHECK_TEACHER_LAYERS layers (default 28, the whole 7B: it fits the H100's memory beside the training
# student, 73.6 of 79 GiB planned at micro-batch 32, and the time budget; fewer where the disk has no room for them),
# and student_ckpt/, the student's widths with 2 layers, for (d) (two checkpoints of the full student would not fit
# the machine's disk beside the models). The steps, each in its own process:
#   (a) placement: both models loaded from their HF folders by models.source.load_model, every tensor listed by
#       runtime.placement.misplaced against the GPU, one teacher forward over the 152k vocabulary;
#   (b) throughput: benchmarks/step_throughput.py, on-policy TSD-KD steps (32 sequences of <= 64 + 128 tokens) at
#       batch.micro_size 1 and auto: per-phase times, student MFU, peak and reserved GPU memory against the memory
#       plan's figure, and the plan's choice for auto;
#   (c) fp16: the same step in fp16 (8 sequences, 32 new tokens): finite losses, skipped updates, the loss scale;
#   (d) checkpoints: tsdkd-train on configs/tsdkd_14b_to_1.5b.yaml (student_ckpt/ and the teacher), asynchronous
#       saves after steps 1 and 2 (the time each blocks training, when each is published), a SIGUSR1 after step 2
#       as a scheduler's preemption would send, then the job again with checkpoint.resume=auto: step 3 and
#       checkpoint.export_hf; the export loads with transformers, its tensors are the initial student's, some
#       changed, and TensorBoard holds the three steps.
# The planned seconds of each step on an H100 are in README.md ("The one-GPU check"); the summary prints each step's
# measured seconds beside them. Steps (a)-(d) do not depend on one another: one that fails is reported and the check
# goes on (so one GPU run yields every figure it can), then ends FAILED. Everything ends in one summary block (the
# last lines of the output hold every figure), whatever happens: a step's error or time limit, a full disk, a signal,
# or a line of this script itself.
#
# Not checked on one GPU: tensor/pipeline parallelism over NCCL (it needs 2+ GPUs: the CPU tests prove TP/PP against
# serial runs on gloo); vLLM rollouts (its CUDA build pins torch 2.13 and is far larger than the 64 MiB a run may
# carry); Transformer Engine (never installed: the job refuses it, megatron's optimizer would be TE's FusedAdam).
#
# Before writing anything it checks the disk: step_throughput.py --disk-estimate gives the bytes the check writes
# (the models, student_ckpt/'s two checkpoints and its export: ~30 GiB with the whole teacher) and the bytes one
# teacher layer adds; the work folder goes to ${TMPDIR:-/tmp} or else this checkout, whichever has room; where
# neither has, the teacher keeps as many layers as fit (the summary says so) or, at none, the check stops there.
#
# On a CPU (no CUDA) it runs the same steps at tiny shapes (a 1,000-token synthetic tokenizer) in 1.5-4 minutes on
# the 2 shared cores, so CI keeps them alive (tests/test_gpu_check.py); nothing is installed there: the venv has
# megatron-core.
#
# Offline installs. The GPU machines have torch, transformers, tokenizers, safetensors, sentencepiece,
# tensorboard, filelock, tqdm and pyyaml, but no megatron-core and no network. When `import megatron.core` fails,
# the script installs the wheels carried in the git-ignored .whl/ folder into a temporary --target folder put
# first on PYTHONPATH (the machine's own site-packages are left alone, torch included); the project runs from this
# checkout through PYTHONPATH. `bash benchmarks/fill_wheels.sh` fills .whl/ (megatron-core's cp312 wheel and
# packaging, 2.7 MB). DeepSpeed: PyPI has only its source archive (no wheel); fill_wheels.sh --deepspeed builds a
# pure-Python wheel from it (its CUDA ops compile on first use, and engine=deepspeed's default torch_adam uses none)
# and adds its missing requirements (hjson, pydantic, pydantic-core, annotated-types, typing-inspection; ~5 MB in
# all). It is installed and measured only with GPU_CHECK_DEEPSPEED=1 (engine=deepspeed beside (b), about a minute
# more: outside the 8-minute plan).
#
# Knobs (environment): TSDKD_PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_SHAPES
# (qwen2.5-1.5b/7b on GPU, tiny on CPU), GPU_CHECK_TEACHER_LAYERS (the teacher's layers at real shapes, default 28),
# GPU_CHECK_DEADLINE (seconds for the whole check, 450 on a GPU: each step's time limit is cut to what is left, so
# the summary is printed inside 8 minutes), GPU_CHECK_KEEP=1 keeps the temporary folder, TSDKD_PEAK_FLOPS overrides
# the peak bf16 FLOP/s used for MFU, GPU_CHECK_WHEELS names the wheel folder (default .whl), GPU_CHECK_DEEPSPEED=1.
#
# Exit status: 0 when every step passed; otherwise 1 (a failed step; its status is in the summary) or the status
# of the step that stopped the check (124: the deadline), after the summary.
set -eEuo pipefail   # -E: the ERR trap (which line failed) also inside functions
START=$SECONDS

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
if [ -n "${TSDKD_PYTHON:-}" ]; then PY=$TSDKD_PYTHON
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

# ---- the summary: kept in memory (a full disk cannot lose it), printed once, on every way out ----------------------
SUMMARY=""
STEP_TIMES=()
FAILED_STEPS=()    # steps that failed while the check went on; the check then ends FAILED
STATUS=""          # set where the check stops; at an exit without it: OK if the exit status is 0, else FAILED
LAST_ERROR=""
PRINTED=0
WORK=""
STEP_RC=0
DEVICE="?"; PYVER="?"; TORCHVER="?"; SHAPES="?"; MEGATRON_VERSION="-"
BUDGET=400         # planned seconds on an H100 (README.md, "The one-GPU check")
# planned seconds per step on an H100 (README.md's table; printed beside the measured ones on a GPU)
declare -A PLANNED=([preflight]=15 [install]=10 [models]=40 [placement]=35 [throughput]=100 [fp16]=40 [train]=50
                    [resume]=50 [export]=15)
note() { SUMMARY+="$*"$'\n'; }
say() { echo "[gpu_check +$((SECONDS - START))s] $*"; }

print_summary() {
    PRINTED=1
    local times="" entry
    for entry in "${STEP_TIMES[@]}"; do
        times+="${times:+, }$entry"
        local planned=${PLANNED[${entry% *}]:-}
        if [ "${GPU:-0}" = 1 ] && [ -n "$planned" ]; then times+=" (planned $planned)"; fi
    done
    echo
    echo "================ gpu_check summary: $1 ================"
    echo "machine: $DEVICE; python $PYVER, torch $TORCHVER; shapes $SHAPES"
    echo "step seconds: ${times:-none}; total $((SECONDS - START)) s (planned $BUDGET s on an H100, deadline" \
         "${DEADLINE:-?} s)"
    printf '%s' "$SUMMARY"
    echo "not checked on one GPU: TP/PP over NCCL (2+ GPUs), vLLM rollouts (its build pins another torch)," \
         "Transformer Engine (refused)"
    echo "================ end of gpu_check summary ================"
}

finish() {
    local rc=$?
    trap - EXIT ERR
    if [ "$PRINTED" = 0 ]; then
        if [ "$rc" = 0 ]; then print_summary "OK"
        else print_summary "${STATUS:-FAILED (exit status $rc${LAST_ERROR:+ at $LAST_ERROR})}"
        fi
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap finish EXIT
trap 'LAST_ERROR="line $LINENO: $BASH_COMMAND"' ERR
trap 'note "stopped by a signal after $((SECONDS - START)) s"; STATUS="FAILED (signal)"; exit 143' TERM INT HUP

export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ---- where are we -----------------------------------------------------------------------------------------------
read -r GPU PYVER TORCHVER MEGATRON_VERSION DEVICE_NAME < <("$PY" - <<'EOF'
import platform, torch
gpu = torch.cuda.is_available()
name = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)"
        if gpu else "CPU")
try:   # here, not in a process of its own: an import of megatron costs seconds
    import megatron.core
    megatron_version = megatron.core.__version__
except Exception:   # absent, or broken: the carried wheel replaces it
    megatron_version = "-"
print(int(gpu), platform.python_version(), torch.__version__, megatron_version, name.replace(" ", "_"))
EOF
) || true
[ -n "${GPU:-}" ] || { note "error: $PY could not import torch"; STATUS="FAILED (no torch)"; exit 1; }
DEVICE=${DEVICE_NAME//_/ }
if [ "$GPU" = 1 ]; then
    SHAPES=${GPU_CHECK_SHAPES:-qwen2.5-1.5b/7b}
    DEADLINE=${GPU_CHECK_DEADLINE:-450}
    # the settings every GPU job runs with (one CUDA queue for megatron's overlap, expandable segments, ...)
    # shellcheck source=../slurm/gpu_env.sh
    source "$REPO/slurm/gpu_env.sh"
else
    SHAPES=${GPU_CHECK_SHAPES:-tiny}
    DEADLINE=${GPU_CHECK_DEADLINE:-1200}
fi
if [ "$SHAPES" = tiny ]; then
    # seconds on 2 CPU cores; the figures only prove the path runs (a 1,000-token synthetic tokenizer, 1,024 rows)
    TEACHER_LAYERS=2
    shape_args() {
        MODEL_ARGS=(--shapes tiny --student-hidden 64 --student-layers 2 --teacher-hidden 128
                    --teacher-layers "$TEACHER_LAYERS" --vocab 1024 --tokenizer-vocab 1000 --ckpt-student-layers 2)
    }
    BATCH=4; NEW=16; PROMPT=64; BENCH_STEPS=2      # (b)
    FP16_BATCH=4; FP16_NEW=16                      # (c)
    CKPT_BATCH=4; CKPT_NEW=16                      # (d)
else
    # the student at full depth; the teacher's layers from the budget (README.md: the plan): all 28 of the 7B's
    TEACHER_LAYERS=${GPU_CHECK_TEACHER_LAYERS:-}   # empty: all of them (the estimate below says how many)
    shape_args() {
        MODEL_ARGS=(--shapes "$SHAPES" ${TEACHER_LAYERS:+--teacher-layers "$TEACHER_LAYERS"} --ckpt-student-layers 2)
    }
    BATCH=32; NEW=128; PROMPT=64; BENCH_STEPS=2    # ~6k tokens a step, the rollout at the config's 128 tokens
    FP16_BATCH=8; FP16_NEW=32
    CKPT_BATCH=8; CKPT_NEW=32
fi
shape_args

# ---- disk preflight: a work folder where the whole check fits, chosen before anything is written -----------------
free_kib() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }
gib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f", k / 1048576}'; }
ESTIMATE=$("$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" --dtype bf16 --disk-estimate 2>/dev/null) || true
NEED_BYTES=$(awk '/^disk_needed_bytes / {print $2}' <<< "$ESTIMATE")
LAYER_BYTES=$(awk '/^disk_teacher_layer_bytes / {print $2}' <<< "$ESTIMATE")
TEACHER_LAYERS_ALL=$(awk '/^teacher_layers_all / {print $2}' <<< "$ESTIMATE")
TEACHER_LAYERS=${TEACHER_LAYERS:-$(awk '/^teacher_layers / {print $2}' <<< "$ESTIMATE")}
if [ -z "$NEED_BYTES" ]; then
    note "disk preflight: step_throughput.py --disk-estimate printed no estimate (run it by hand to see why)"
    STATUS="FAILED at disk preflight"
    exit 1
fi
NEED_KIB=$((NEED_BYTES / 1024))
TMPBASE=""
BEST_FREE=0; BEST_BASE=""
for candidate in "${TMPDIR:-/tmp}" "$REPO"; do
    [ -d "$candidate" ] && [ -w "$candidate" ] || continue
    free=$(free_kib "$candidate" || echo 0)
    if [ "$free" -ge "$NEED_KIB" ]; then TMPBASE=$candidate; break; fi
    if [ "$free" -gt "$BEST_FREE" ]; then BEST_FREE=$free; BEST_BASE=$candidate; fi
done
if [ -z "$TMPBASE" ] && [ "$SHAPES" != tiny ] && [[ "$LAYER_BYTES" =~ ^[1-9][0-9]*$ ]] \
        && [[ "$TEACHER_LAYERS" =~ ^[0-9]+$ ]]; then
    # fewer teacher layers rather than no check: each layer the disk cannot hold goes
    short_kib=$((NEED_KIB - BEST_FREE))
    drop=$(( (short_kib * 1024 + LAYER_BYTES - 1) / LAYER_BYTES ))
    if [ "$drop" -lt "$TEACHER_LAYERS" ]; then
        note "disk: ${TEACHER_LAYERS} teacher layers need ~$(gib "$NEED_KIB") GiB but $BEST_BASE has" \
             "$(gib "$BEST_FREE") GiB free: the teacher keeps $((TEACHER_LAYERS - drop)) layers"
        TEACHER_LAYERS=$((TEACHER_LAYERS - drop))
        NEED_KIB=$((NEED_KIB - drop * LAYER_BYTES / 1024))
        TMPBASE=$BEST_BASE
        shape_args
    fi
fi
if [ -z "$TMPBASE" ]; then
    note "disk: the check writes ~$(gib "$NEED_KIB") GiB (models, checkpoints, export), but ${TMPDIR:-/tmp} has" \
         "$(gib "$(free_kib "${TMPDIR:-/tmp}")") GiB free and $REPO $(gib "$(free_kib "$REPO")") GiB;" \
         "set TMPDIR to a folder with room"
    STATUS="FAILED at disk preflight"
    exit 1
fi
WORK=$(mktemp -d "$TMPBASE/tsdkd_gpu_check.XXXXXX")
shape_args
SHAPES+=" (student all layers, teacher ${TEACHER_LAYERS:-?} of ${TEACHER_LAYERS_ALL:-?})"
note "disk: ~$(gib "$NEED_KIB") GiB needed, $(gib "$(free_kib "$TMPBASE")") GiB free in $TMPBASE"
STEP_TIMES+=("preflight $((SECONDS - START))")

# step [--soft] NAME TIMEOUT_S CMD...: run CMD with a time limit, its output shown and kept in $WORK/NAME.log (the
# limit is cut to what is left of the deadline, so the summary is printed before an outer timeout). A failure stops
# the check, or with --soft is noted (FAILED_STEPS) and the check goes on; STEP_RC holds the command's status.
step() {
    local soft=0 name limit began=$SECONDS rc left
    if [ "$1" = --soft ]; then soft=1; shift; fi
    name=$1 limit=$2
    shift 2
    left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        note "step $name not started: $((SECONDS - START)) s used of the ${DEADLINE} s deadline"
        STATUS="FAILED at $name (deadline)"
        exit 124
    fi
    [ "$limit" -le "$left" ] || limit=$left
    say "step $name (limit ${limit}s)"
    set +e
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    STEP_RC=$rc
    STEP_TIMES+=("$name $((SECONDS - began))")
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note "step $name: timed out after ${limit}s"; fi
        note "step $name FAILED with exit code $rc; its last lines:"
        note "$(grep -v '^\s*$' "$WORK/$name.log" 2>/dev/null | tail -n 15 | sed 's/^/    /')"
        if grep -qs "No space left on device" "$WORK/$name.log" \
                || [ "$(free_kib "$WORK" || echo 0)" -lt $((1024 * 1024)) ]; then
            note "disk full? $(gib "$(free_kib "$WORK")") GiB left in $TMPBASE"
        fi
        if [ "$soft" = 1 ]; then FAILED_STEPS+=("$name"); return 0; fi
        STATUS="FAILED at $name"
        exit "$rc"
    fi
}
# within WANT [KEEP]: the time limit a step asks for, cut to what is left of the deadline less KEEP seconds (room
# for a step's own --time-limit to print what it measured before the step's limit kills it)
within() { local want=$1 left=$((DEADLINE - (SECONDS - START) - ${2:-0})); echo $(( want < left ? want : left )); }

# lines of a step's log matching a pattern, into the summary
keep() { local lines; lines=$(grep -E "$2" "$WORK/$1.log" 2>/dev/null) || return 0; note "$lines"; }
keep_only() { local lines; lines=$(grep -oE "$2" "$WORK/$1.log" 2>/dev/null) || return 0; note "$lines"; }
# a step_throughput.py summary block (from its ==== line on), the lines matching a pattern
keep_block() {
    local lines
    lines=$(sed -n '/^==== step throughput/,$p' "$WORK/$1.log" 2>/dev/null | grep -E "$2") || return 0
    note "$lines"
}

say "python $PY ($PYVER), torch $TORCHVER, device: $DEVICE; shapes $SHAPES; work folder $WORK"

# ---- install: megatron-core (and DeepSpeed, when asked) from the carried wheels, only where missing ---------------
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
DEEPSPEED=0
[ "$GPU" = 1 ] && [ "${GPU_CHECK_DEEPSPEED:-0}" = 1 ] && DEEPSPEED=1
install_wheels() {
    set -euo pipefail   # it runs in a bash of its own (bash -c), which would not stop at a failed pip
    local site=$WORK/site wanted=()
    mkdir -p "$site"
    if [ "$NEED_MEGATRON" = 1 ]; then
        if ! ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1; then
            echo "error: megatron-core is not importable and $WHEELS holds no megatron_core wheel;" \
                 "run 'bash benchmarks/fill_wheels.sh' on a machine with PyPI and carry .whl/" >&2
            return 1
        fi
        wanted+=(megatron-core)
        if ! "$PY" -c 'import sys, packaging.version as v, packaging
sys.exit(v.Version(packaging.__version__) < v.Version("24.2"))' 2>/dev/null; then
            wanted+=(packaging)   # megatron-core needs packaging >= 24.2
        fi
    fi
    if [ "$NEED_DEEPSPEED" = 1 ]; then
        if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
            echo "error: GPU_CHECK_DEEPSPEED=1 but $WHEELS holds no deepspeed wheel; run" \
                 "'bash benchmarks/fill_wheels.sh --deepspeed'" >&2
            return 1
        fi
        wanted+=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection)
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile --target "$site" --quiet \
            "${wanted[@]}"
    else  # no pip: a wheel is a zip archive of the site-packages tree
        for name in "${wanted[@]}"; do
            "$PY" -m zipfile -e "$(ls "$WHEELS"/"${name//-/_}"-*.whl | head -n 1)" "$site"
        done
    fi
    echo "installed ${wanted[*]} into $site"
}
NEED_MEGATRON=0; NEED_DEEPSPEED=0; began=$SECONDS
[ "$MEGATRON_VERSION" != - ] || NEED_MEGATRON=1
if [ "$DEEPSPEED" = 1 ] && ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then NEED_DEEPSPEED=1; fi
if [ "$NEED_MEGATRON" = 0 ] && [ "$NEED_DEEPSPEED" = 0 ]; then
    say "megatron-core $MEGATRON_VERSION is importable: nothing to install"
    STEP_TIMES+=("install $((SECONDS - began))")
else
    export -f install_wheels
    export PY REPO WORK WHEELS NEED_MEGATRON NEED_DEEPSPEED
    step install 60 bash -c install_wheels
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    "$PY" -c 'import megatron.core as m; print("megatron-core", m.__version__, "from", m.__file__)'
fi
if [ "$DEEPSPEED" = 1 ]; then
    note "deepspeed: $("$PY" -c 'import deepspeed; print(deepspeed.__version__, "importable")' 2>&1 | tail -n 1)"
fi

# ---- models: random weights at the chosen shapes, prompts ------------------------------------------------------
MODELS=$WORK/models
step models 120 "$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" --dtype bf16 --batch "$BATCH" \
    --steps "$BENCH_STEPS" --eval-count 0 --models-dir "$MODELS" --prepare-only
keep models '^(vocabulary:|made random)'

# ---- (a) placement: both models through models.source.load_model, every tensor on the device, a teacher forward --
cat > "$WORK/placement.py" <<'PYEOF'
"""Both models loaded from their HF folders as the trainer loads them (models.source.load_model, bf16, the shared
padded vocabulary), every tensor (parameters, buffers, tensor attributes) checked against this rank's device with
runtime.placement.misplaced, then one teacher forward. load_model asserts placement itself: its error names every
tensor elsewhere."""
import math
import sys
import time

import torch

from megatron_tsdkd.models.builder import padded_vocab_size
from megatron_tsdkd.models.source import load_model, resolve_model_source
from megatron_tsdkd.runtime import destroy, device, init_distributed
from megatron_tsdkd.runtime.placement import misplaced, model_tensors

GIB = 2**30
on_gpu = torch.cuda.is_available()


def sync():
    if on_gpu:
        torch.cuda.synchronize()


init_distributed()
here = device()
sources = {name: resolve_model_source(path) for name, path in zip(("student", "teacher"), sys.argv[1:3])}
vocab = max(padded_vocab_size(s.arch.vocab_size, 1) for s in sources.values())
models, weight_bytes, failed = {}, 0, False
for name, source in sources.items():
    start = time.perf_counter()
    try:
        model = load_model(source, dtype=torch.bfloat16, padded_vocab_size=vocab, attention_backend="sdpa")
    except RuntimeError as error:   # assert_placed: the tensors that are not on the device, by name
        print(f"placement: {name}: {error}", flush=True)
        failed = True
        continue
    sync()
    seconds = time.perf_counter() - start
    tensors = list(model_tensors(model))
    wrong = misplaced(model, here)
    weight_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
    params = sum(p.numel() for p in model.parameters())
    print(f"placement: {name} {f'{params / 1e9:.3f}B' if params >= 1e8 else f'{params / 1e6:.2f}M'} parameters, "
          f"{len(tensors)} tensors (parameters, buffers, tensor attributes), {len(wrong)} not on {here}"
          + (f": {', '.join(wrong)}" if wrong else "") + f"; loaded in {seconds:.1f} s", flush=True)
    failed |= bool(wrong)
    models[name] = model
if "teacher" in models:
    teacher = models["teacher"].eval()
    ids = torch.randint(0, sources["teacher"].arch.vocab_size, (1, 256), device=here)
    positions = torch.arange(ids.shape[1], device=here).unsqueeze(0)
    with torch.no_grad():
        start = time.perf_counter()
        logits = teacher(ids, positions, attention_mask=None)
        sync()
        seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(logits.float()).all())
    memory = (f"device memory allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB (the weights "
              f"{weight_bytes / GIB:.2f} GiB), peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB"
              if on_gpu else "device memory n/a on CPU")
    print(f"placement: teacher forward logits [{', '.join(map(str, logits.shape))}] on {logits.device}, "
          f"{'finite' if finite else 'NOT FINITE'}, in {seconds:.2f} s (the first call); {memory}", flush=True)
    failed |= not finite or logits.device != here
destroy()
sys.exit(1 if failed else 0)
PYEOF
step --soft placement 60 "$PY" "$WORK/placement.py" "$MODELS/student" "$MODELS/teacher"
keep placement '^placement: '

# ---- (b) throughput, MFU and memory against the plan, at micro-batch 1 and auto ----------------------------------
ENGINES=megatron
[ "$DEEPSPEED" = 1 ] && ENGINES=megatron,deepspeed
limit=$(within 150 5)
step --soft throughput "$limit" "$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" --dtype bf16 \
    --batch "$BATCH" --new-tokens "$NEW" --prompt-length "$PROMPT" --steps "$BENCH_STEPS" --micro-sizes 1,auto \
    --attentions sdpa --no-hf --engines "$ENGINES" --models-dir "$MODELS" --time-limit $((limit - 10))
keep_only throughput 'batch\.micro_size=auto: .*'
keep_block throughput '^[^[]'

# ---- (c) fp16: the same step in fp16 (dynamic loss scaling), a few steps ------------------------------------------
limit=$(within 70 5)
step --soft fp16 "$limit" "$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" --dtype fp16 \
    --batch "$FP16_BATCH" --new-tokens "$FP16_NEW" --prompt-length "$PROMPT" --steps 2 --micro auto \
    --attentions sdpa --no-hf --models-dir "$MODELS" --time-limit $((limit - 10))
keep_block fp16 '^(====|tokens/s|peak GPU|planner|phase|steps|run )'

# ---- (d) asynchronous checkpoints, a preemption, resume=auto, export --------------------------------------------
# tsdkd-train itself (megatron_tsdkd.cli), watched: how long each save blocks training and when it is published;
# with GPU_CHECK_PREEMPT_AT=N the job sends itself SIGUSR1 after step N, as a scheduler preempting it would. A save
# that megatron-core's optimizer refuses with an AssertionError is reported (CHECKPOINT SAVE FAILED) and the run goes
# on. (Seen with megatron-core 0.16.1 in bf16: fp32 norm weights and bf16 biases in one optimizer param group.)
cat > "$WORK/train.py" <<'PYEOF'
import os
import signal
import sys
import time

from megatron_tsdkd.engines import checkpoint
from megatron_tsdkd.engines.trainer import Trainer

save, train_step = Trainer.save_checkpoint, Trainer.train_step
finalize, publish = checkpoint.CheckpointWriter.finalize, checkpoint.CheckpointWriter.publish
began, waited = {}, [0.0]
PREEMPT_AT = int(os.environ.get("GPU_CHECK_PREEMPT_AT", "0"))


def watched_finalize(self, blocking):
    start = time.perf_counter()
    try:
        return finalize(self, blocking)
    finally:
        waited[0] += time.perf_counter() - start


def watched_save(self):
    start, waited[0] = time.perf_counter(), 0.0
    try:
        path = save(self)
    except AssertionError as error:
        print(f"CHECKPOINT SAVE FAILED at step {self.step}: AssertionError {error}", flush=True)
        return None
    began[os.path.basename(path)] = start
    print(f"checkpoint: the save at step {self.step} blocked training {time.perf_counter() - start:.2f} s "
          f"({waited[0]:.2f} s of it waiting for the write before; "
          f"{'async' if self.cfg.checkpoint.async_save else 'sync'})", flush=True)
    return path


def watched_publish(self, partial, final, *args, **kwargs):
    publish(self, partial, final, *args, **kwargs)
    name = os.path.basename(final)
    if name in began:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(final) for f in files)
        print(f"checkpoint: {name} ({size / 2**30:.2f} GiB) published {time.perf_counter() - began[name]:.2f} s "
              f"after its save began", flush=True)


def preempted_step(self):
    result = train_step(self)
    if self.step == PREEMPT_AT:
        os.kill(os.getpid(), signal.SIGUSR1)
    return result


Trainer.save_checkpoint, Trainer.train_step = watched_save, preempted_step
checkpoint.CheckpointWriter.finalize, checkpoint.CheckpointWriter.publish = watched_finalize, watched_publish
from megatron_tsdkd.cli import main  # noqa: E402

if __name__ == "__main__":   # the checkpoint writer's helper processes import this file again
    main(["train", *sys.argv[1:]])
PYEOF
EXPORT=$WORK/student_hf
TRAIN_ARGS=(--config configs/tsdkd_14b_to_1.5b.yaml
    "models.student.path=$MODELS/student_ckpt" "models.teacher.path=$MODELS/teacher" "data.train=$MODELS/train.jsonl"
    parallel.teacher.tensor=null   # one GPU: the teacher co-located (the config's own teacher layout needs 8)
    method.name=tsdkd rollout.on_policy_prob=1 precision.dtype=bf16 schedule.max_steps=3
    "batch.global_size=$CKPT_BATCH" batch.micro_size=auto "data.max_length=$((PROMPT + CKPT_NEW))"
    "data.max_prompt_length=$PROMPT" "rollout.max_new_tokens=$CKPT_NEW"
    "checkpoint.dir=$WORK/checkpoints" checkpoint.interval=1 checkpoint.keep_last=1 checkpoint.resume=auto
    checkpoint.async_save=true "checkpoint.export_hf=$EXPORT"
    "logging.dir=$WORK/tensorboard" logging.interval=1 logging.progress_bar=false)
step --soft train 90 env GPU_CHECK_PREEMPT_AT=2 "$PY" "$WORK/train.py" "${TRAIN_ARGS[@]}"
keep train '^(checkpoint: |stopped by a signal|CHECKPOINT SAVE FAILED)'
if [ "$STEP_RC" = 0 ] && ! grep -q '^stopped by a signal at step 2' "$WORK/train.log"; then
    note "train: no 'stopped by a signal at step 2' (the preemption after step 2)"
    FAILED_STEPS+=(train)
fi
if [ "$STEP_RC" = 0 ]; then
    step --soft resume 90 "$PY" "$WORK/train.py" "${TRAIN_ARGS[@]}"
    keep_only resume 'resumed from .* at step [0-9]+'
    keep resume '^(checkpoint: |exported|training finished|CHECKPOINT SAVE FAILED)'
    if [ "$STEP_RC" = 0 ] && ! grep -q '^training finished at step 3' "$WORK/resume.log"; then
        note "resume: no 'training finished at step 3'"
        FAILED_STEPS+=(resume)
    fi
    if grep -qs '^CHECKPOINT SAVE FAILED' "$WORK/train.log" "$WORK/resume.log"; then
        FAILED_STEPS+=("checkpoint save")
    fi
fi

cat > "$WORK/check_export.py" <<'EOF'
"""The exported student loads with transformers and runs; its tensors are the initial student's, some changed by
training; the training runs' logged figures (TensorBoard: steps 1-2 before the preemption, 3 after the resume)."""
import glob
import math
import sys

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

export, initial, tb = sys.argv[1:4]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).to(device).eval()
tok = AutoTokenizer.from_pretrained(export)
ids = tok("Compute 3+4-2.", return_tensors="pt").input_ids.to(device)
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert logits.shape[-1] == model.config.vocab_size, (logits.shape, model.config.vocab_size)
assert torch.isfinite(logits.float()).all(), "non-finite logits"


def tensors(folder):
    out = {}
    for path in sorted(glob.glob(f"{folder}/*.safetensors")):
        f = safe_open(path, "pt")
        out.update({name: (f, name) for name in f.keys()})
    return out


new, old = tensors(export), tensors(initial)
common = sorted(set(new) & set(old))
assert common and set(new) == set(old), f"tensor names differ: {sorted(set(new) ^ set(old))[:5]}"
changed = elements = 0
for name in common:
    a, b = new[name][0].get_tensor(name), old[name][0].get_tensor(name)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    changed += int((a.float() != b.float()).sum())
    elements += a.numel()
assert changed > 0, "training changed no weight"
params = sum(p.numel() for p in model.parameters())
print(f"export: loads with transformers as {type(model).__name__} ({params / 1e6:.2f}M parameters, bf16, on {device}); "
      f"logits [{', '.join(map(str, logits.shape))}] finite; {len(common)} tensors as the initial student's, "
      f"{100 * changed / elements:.2f}% of their elements changed by training")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(tb, size_guidance={"scalars": 0})
acc.Reload()
tags = set(acc.Tags()["scalars"])
def series(tag):
    return [e.value for e in acc.Scalars(tag)] if tag in tags else []
loss, tps, step_s = series("loss/total"), series("throughput/tokens_per_s"), series("time/step")
assert len(loss) == 3 and all(math.isfinite(v) for v in loss), f"loss/total over the runs: {loss}"
print("training runs (TensorBoard): loss/total " + " -> ".join(f"{v:.4f}" for v in loss)
      + "; tokens/s " + ", ".join(f"{v:.0f}" for v in tps) + "; time/step " + ", ".join(f"{v:.2f}" for v in step_s)
      + " s (steps 1 and 3 include a start's warm-up)")
EOF
if [ -f "$EXPORT/config.json" ]; then
    step --soft export 40 "$PY" "$WORK/check_export.py" "$EXPORT" "$MODELS/student_ckpt" "$WORK/tensorboard"
    keep export '^(export:|training runs)'
elif [ "$STEP_RC" = 0 ]; then
    note "export: no Hugging Face folder at $EXPORT"
    FAILED_STEPS+=(export)
fi

if [ "$GPU" = 1 ] && [ $((SECONDS - START)) -gt $BUDGET ]; then
    note "over the plan: $((SECONDS - START)) s > $BUDGET s planned"
fi
if [ "${#FAILED_STEPS[@]}" -gt 0 ]; then
    STATUS="FAILED: ${FAILED_STEPS[*]}"
    exit 1
fi
exit 0   # the summary (OK) and the clean-up: finish, the EXIT trap
