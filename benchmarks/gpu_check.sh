#!/usr/bin/env bash
# One command that checks the whole GPU path on a machine with one GPU, in at most 5 minutes end to end:
#
#     bash benchmarks/gpu_check.sh
#
# On a GPU (torch.cuda.is_available()), at Qwen2.5-1.5B (student) / Qwen2.5-7B (teacher) widths, heads and
# vocabularies, with 4 of their 28 layers each (GPU_CHECK_LAYERS; 0 = all, which needs a longer deadline), random
# weights, bf16, and a synthetic tokenizer of Qwen2.5's size (151,665 tokens, built locally with the `tokenizers`
# library; embeddings of 151,936 / 152,064 rows, padded to 152,064 in training), so our losses and sampling and
# the HF-style baseline all run over ~152k columns:
#   1. a 3-step on-policy TSD-KD training run through tsdkd-train (configs/tsdkd_14b_to_1.5b.yaml with overrides),
#      scoring a small held-out set before and after (data.eval) and exporting the student (checkpoint.export_hf);
#   2. `python -m megatron_tsdkd.cli eval` of the export, and a check that it loads with transformers (finite logits
#      over the real vocabulary, the same tensors as the initial student, some of them changed by training);
#   3. benchmarks/step_throughput.py at the same shapes: tokens/s against the HF-style step (HF generate + dense
#      full-vocabulary loss), student fwd/bwd MFU, peak GPU memory against the memory planner's prediction, the
#      trainer's per-phase times, and SDPA against megatron's local attention;
#   4. benchmarks/rollout_engines.py, when `import vllm` works (the vllm wheel carried): rollout tokens/s of vLLM,
#      our megatron decode and HF generate on a small random Qwen2, and the vLLM weight sync's seconds; without
#      vLLM the summary says "rollout engines: vLLM not installed (skipped)" and the check goes on.
# Everything ends in one summary block (the last lines of the output hold every figure, the vocabulary among them),
# whatever fails: a step's error or time limit, a full disk, a signal, or a line of this script itself.
#
# Before writing anything it checks the disk: step_throughput.py --disk-estimate gives the bytes the check writes
# (both models, the student's checkpoint and export; ~14 GB at the default 4 layers, ~48 GB with all of them); the
# work folder goes to ${TMPDIR:-/tmp} or else this checkout, whichever has room, or the check stops there with the
# summary naming both folders' free space.
#
# On a CPU (no CUDA) it runs the same path at tiny shapes (a 1,000-token synthetic tokenizer) in about 2 minutes on
# 2 cores, so CI keeps it alive (tests/test_gpu_check.py); nothing is installed there: the venv has megatron-core.
# The rollout benchmark (step 4) is skipped there: the vLLM path has its own tests (tests/test_vllm_*.py).
#
# Offline installs. The GPU machines have Python 3.12, torch 2.11 (CUDA 13), transformers, tokenizers, safetensors,
# sentencepiece, tensorboard, tqdm and pyyaml, but no megatron-core and no network. When `import megatron.core`
# fails, the script installs the wheels carried in the working tree's git-ignored .whl/ folder, into a temporary
# --target folder put first on PYTHONPATH (the machine's own site-packages are left alone); the project itself runs
# from this checkout through PYTHONPATH. Fill .whl/ once, on a machine with PyPI, with
#
#     bash benchmarks/fill_wheels.sh
#     # = pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl megatron-core==0.16.1 packaging==26.4
#
# (about 2.7 MB: megatron-core's cp312 wheel and packaging, which megatron-core needs at >= 24.2). For the device tool
# pass carry [".whl"].
#
# Knobs (environment): TSDKD_PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_SHAPES
# (qwen2.5-1.5b/7b on GPU, tiny on CPU), GPU_CHECK_LAYERS (layers of each model at real shapes, default 4; 0 = all),
# GPU_CHECK_DEADLINE (seconds for the whole check, 270 on a GPU: each step's time limit is cut to what is left, so
# the summary is printed within 5 minutes), GPU_CHECK_KEEP=1 keeps the temporary folder, TSDKD_PEAK_FLOPS overrides
# the peak bf16 FLOP/s used for MFU, GPU_CHECK_WHEELS names the wheel folder (default .whl).
#
# Exit status: 0 when every step passed; otherwise the failing step's status (124: a time limit), after the summary.
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
FAILED=""          # a failure that lets the check go on (the checkpoint save watch); the check ends FAILED
STATUS=""          # set where the check stops; at an exit without it: OK if the exit status is 0, else FAILED
LAST_ERROR=""
PRINTED=0
WORK=""
DEVICE="?"; PYVER="?"; TORCHVER="?"; SHAPES="?"; LAYERS_NOTE=""
BUDGET=300
note() { SUMMARY+="$*"$'\n'; }
say() { echo "[gpu_check +$((SECONDS - START))s] $*"; }

print_summary() {
    PRINTED=1
    echo
    echo "================ gpu_check summary: $1 ================"
    echo "machine: $DEVICE; python $PYVER, torch $TORCHVER; shapes $SHAPES$LAYERS_NOTE"
    echo "step seconds: ${STEP_TIMES[*]:-none}; total $((SECONDS - START)) s (budget $BUDGET s on a GPU)"
    printf '%s' "$SUMMARY"
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

# ---- 0. where are we --------------------------------------------------------------------------------------------
read -r GPU PYVER TORCHVER DEVICE_NAME < <("$PY" - <<'EOF'
import platform, torch
gpu = torch.cuda.is_available()
print(int(gpu), platform.python_version(), torch.__version__, torch.cuda.get_device_name().replace(" ", "_") if gpu else "CPU")
EOF
) || true
[ -n "${GPU:-}" ] || { note "error: $PY could not import torch"; STATUS="FAILED (no torch)"; exit 1; }
DEVICE=${DEVICE_NAME//_/ }
if [ "$GPU" = 1 ]; then
    SHAPES=${GPU_CHECK_SHAPES:-qwen2.5-1.5b/7b}
    DEADLINE=${GPU_CHECK_DEADLINE:-270}
else
    SHAPES=${GPU_CHECK_SHAPES:-tiny}
    DEADLINE=${GPU_CHECK_DEADLINE:-1200}
fi
if [ "$SHAPES" = tiny ]; then
    # seconds on 2 CPU cores; the figures only prove the path runs (a 1,000-token synthetic tokenizer, 1,024 rows)
    MODEL_ARGS=(--shapes tiny --student-hidden 64 --student-layers 2 --teacher-hidden 128 --teacher-layers 2
                --vocab 1024 --tokenizer-vocab 1000)
    BATCH=4; MICRO=2; NEW=16; PROMPT=64; EVAL_N=4; EVAL_BATCH=4; BENCH_STEPS=2
else
    # real widths and vocabularies: 32 sequences of <= 64 + 128 tokens per step (~5k tokens), 4 micro-batches in
    # the training run; GPU_CHECK_LAYERS of each model's layers (fewer than the real 28: the 5-minute budget)
    LAYERS=${GPU_CHECK_LAYERS:-4}
    MODEL_ARGS=(--shapes "$SHAPES" --layers "$LAYERS")
    if [ "$LAYERS" = 0 ]; then LAYERS_NOTE=" (all layers)"; else LAYERS_NOTE=" ($LAYERS layers of each model)"; fi
    BATCH=32; MICRO=8; NEW=128; PROMPT=64; EVAL_N=16; EVAL_BATCH=16; BENCH_STEPS=3
fi
SIZE_ARGS=(--batch "$BATCH" --new-tokens "$NEW" --prompt-length "$PROMPT" --dtype bf16)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ---- disk preflight: a work folder where the whole check fits, chosen before anything is written -----------------
free_kib() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }
gib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f", k / 1048576}'; }
NEED_BYTES=$("$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" "${SIZE_ARGS[@]}" --disk-estimate 2>/dev/null \
             | awk '/^disk_needed_bytes / {print $2}') || true
if [ -z "$NEED_BYTES" ]; then
    note "disk preflight: step_throughput.py --disk-estimate printed no estimate (run it by hand to see why)"
    STATUS="FAILED at disk preflight"
    exit 1
fi
NEED_KIB=$((NEED_BYTES / 1024))
TMPBASE=""
for candidate in "${TMPDIR:-/tmp}" "$REPO"; do
    if [ -d "$candidate" ] && [ -w "$candidate" ] && [ "$(free_kib "$candidate" || echo 0)" -ge "$NEED_KIB" ]; then
        TMPBASE=$candidate
        break
    fi
done
if [ -z "$TMPBASE" ]; then
    note "disk: the check writes ~$(gib "$NEED_KIB") GiB (models, checkpoint, export), but ${TMPDIR:-/tmp} has" \
         "$(gib "$(free_kib "${TMPDIR:-/tmp}")") GiB free and $REPO $(gib "$(free_kib "$REPO")") GiB;" \
         "set TMPDIR to a folder with room, or GPU_CHECK_LAYERS to fewer layers"
    STATUS="FAILED at disk preflight"
    exit 1
fi
WORK=$(mktemp -d "$TMPBASE/tsdkd_gpu_check.XXXXXX")
note "disk: ~$(gib "$NEED_KIB") GiB needed, $(gib "$(free_kib "$TMPBASE")") GiB free in $TMPBASE"

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, its output shown and kept in $WORK/NAME.log
# (the limit is cut to what is left of GPU_CHECK_DEADLINE, so the summary is printed before an outer timeout)
step() {
    local name=$1 limit=$2 began=$SECONDS rc left
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
    STEP_TIMES+=("$name $((SECONDS - began))")
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note "step $name: timed out after ${limit}s"; fi
        note "step $name FAILED with exit code $rc; its last lines:"
        note "$(tail -n 15 "$WORK/$name.log" 2>/dev/null | sed 's/^/    /')"
        if grep -qs "No space left on device" "$WORK/$name.log" \
                || [ "$(free_kib "$WORK" || echo 0)" -lt $((1024 * 1024)) ]; then
            note "disk full? $(gib "$(free_kib "$WORK")") GiB left in $TMPBASE"
        fi
        STATUS="FAILED at $name"
        exit "$rc"
    fi
}

# lines of a step's log matching a pattern, into the summary
keep() { local lines; lines=$(grep -E "$2" "$WORK/$1.log" 2>/dev/null) || return 0; note "$lines"; }

say "python $PY ($PYVER), torch $TORCHVER, device: $DEVICE; shapes $SHAPES$LAYERS_NOTE; work folder $WORK"

# ---- 1. megatron-core from the carried wheels, only where it is missing -------------------------------------------
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
install_wheels() {
    local site=$WORK/site
    mkdir -p "$site"
    if ! ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1; then
        echo "error: megatron-core is not importable and .whl/ holds no megatron_core wheel;" \
             "run 'bash benchmarks/fill_wheels.sh' on a machine with PyPI and carry .whl/" >&2
        return 1
    fi
    local wanted=(megatron-core)
    if ! "$PY" -c 'import sys, packaging.version as v, packaging; sys.exit(v.Version(packaging.__version__) < v.Version("24.2"))' 2>/dev/null; then
        wanted+=(packaging)   # megatron-core needs packaging >= 24.2
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --target "$site" --quiet "${wanted[@]}"
    else  # no pip: a wheel is a zip archive of the site-packages tree
        for name in "${wanted[@]}"; do
            "$PY" -m zipfile -e "$(ls "$WHEELS"/"${name//-/_}"-*.whl | head -n 1)" "$site"
        done
    fi
    echo "installed ${wanted[*]} into $site"
}
if "$PY" -c 'import megatron.core' 2>/dev/null; then
    say "megatron-core $("$PY" -c 'import megatron.core as m; print(m.__version__)') is importable: nothing to install"
    STEP_TIMES+=("install 0")
else
    export -f install_wheels
    export PY REPO WORK WHEELS
    step install 120 bash -c install_wheels
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    "$PY" -c 'import megatron.core as m; print("megatron-core", m.__version__, "from", m.__file__)'
fi

# ---- 2. random models at the chosen shapes, prompts and a held-out set with answers -------------------------------
MODELS=$WORK/models
step models 300 "$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" "${SIZE_ARGS[@]}" --steps "$BENCH_STEPS" \
    --eval-count "$EVAL_N" --models-dir "$MODELS" --prepare-only
keep models '^(vocabulary:|made random)'

# ---- 3. a 3-step on-policy TSD-KD run, eval before/after, HF export ------------------------------------------------
EXPORT=$WORK/student_hf
# tsdkd-train itself (megatron_tsdkd.cli), with one watch: a checkpoint save that megatron-core's optimizer refuses
# with an AssertionError is reported and the run goes on to its export and evaluation, so one GPU run still yields
# every figure; the check then ends FAILED. (Seen with megatron-core 0.16.1 in bf16: the fp32 RMSNorm weights and
# bf16 biases share an optimizer param group, and the distributed optimizer maps their states to the wrong params.)
cat > "$WORK/train.py" <<'PYEOF'
import sys

from megatron_tsdkd.training.trainer import Trainer

save = Trainer.save_checkpoint


def watched_save(self):
    try:
        return save(self)
    except AssertionError as error:
        print(f"CHECKPOINT SAVE FAILED at step {self.step}: AssertionError {error}", flush=True)
        return None


Trainer.save_checkpoint = watched_save
from megatron_tsdkd.cli import main  # noqa: E402

if __name__ == "__main__":   # the checkpoint writer's helper processes import this file again
    main(["train", *sys.argv[1:]])
PYEOF
step train 420 "$PY" "$WORK/train.py" --config configs/tsdkd_14b_to_1.5b.yaml \
    "models.student.path=$MODELS/student" "models.teacher.path=$MODELS/teacher" \
    "data.train=$MODELS/train.jsonl" "data.eval=$MODELS/eval.jsonl" \
    method.name=tsdkd rollout.on_policy_prob=1 precision.dtype=bf16 schedule.max_steps=3 \
    "batch.global_size=$BATCH" "batch.micro_size=$MICRO" "data.max_length=$((PROMPT + NEW))" \
    "data.max_prompt_length=$PROMPT" "rollout.max_new_tokens=$NEW" \
    "checkpoint.dir=$WORK/checkpoints" checkpoint.resume=none checkpoint.keep_last=1 "checkpoint.export_hf=$EXPORT" \
    "logging.dir=$WORK/tensorboard" logging.interval=1 logging.progress_bar=false
if ! grep -q "training finished at step 3" "$WORK/train.log"; then
    note "train: no 'training finished at step 3'"
    STATUS="FAILED at train"
    exit 1
fi
keep train '^(student accuracy|exported|training finished|CHECKPOINT SAVE FAILED)'
if grep -q '^CHECKPOINT SAVE FAILED' "$WORK/train.log"; then
    FAILED="checkpoint save (see the CHECKPOINT SAVE FAILED line)"
else
    note "checkpoint: saved at step 3"
fi

# ---- 4. eval of the export; the export loads with transformers ----------------------------------------------------
step eval 240 "$PY" -m megatron_tsdkd.cli eval --model "$EXPORT" --data "$MODELS/eval.jsonl" --dtype bf16 \
    --max-new-tokens "$NEW" --max-prompt-length "$PROMPT" --batch-size "$EVAL_BATCH"
keep eval '^accuracy of'

cat > "$WORK/check_export.py" <<'EOF'
"""The exported student loads with transformers and runs; its tensors are the initial student's, some changed by
training; the training run's logged figures (TensorBoard)."""
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
assert len(loss) == 3 and all(math.isfinite(v) for v in loss), f"loss/total over the run: {loss}"
print("training run (TensorBoard): loss/total " + " -> ".join(f"{v:.4f}" for v in loss)
      + "; tokens/s " + ", ".join(f"{v:.0f}" for v in tps) + "; time/step " + ", ".join(f"{v:.2f}" for v in step_s)
      + " s (step 1 includes warm-up)")
EOF
step export 180 "$PY" "$WORK/check_export.py" "$EXPORT" "$MODELS/student" "$WORK/tensorboard"
keep export '^(export:|training run)'

# GPU_CHECK_DEEPSPEED=1 on a GPU also measures engine=deepspeed (ZeRO-3, HF generate) beside the megatron engine,
# when the machine has DeepSpeed (it ships as a source package); off by default: a fourth process does not fit the
# 5 minutes. The CPU test run leaves it out for time.
ENGINES=megatron
if [ "$GPU" = 1 ] && [ "${GPU_CHECK_DEEPSPEED:-0}" = 1 ] && "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    ENGINES=megatron,deepspeed
fi
# ---- 5. throughput, MFU, memory against the planner, SDPA against local, against the HF-style step ---------------
rm -rf "$WORK/checkpoints"   # the throughput runs need the disk more than the finished run's checkpoint
step throughput 480 "$PY" benchmarks/step_throughput.py "${MODEL_ARGS[@]}" "${SIZE_ARGS[@]}" --steps "$BENCH_STEPS" \
    --eval-count "$EVAL_N" --models-dir "$MODELS" --attentions sdpa,local --child-timeout 300 --engines "$ENGINES"
note "$(sed -n '/^==== step throughput/,$p' "$WORK/throughput.log" | grep -v '^\[')"

# ---- 6. rollout engines: vLLM against our megatron decode and HF generate, and the weight sync ----------------------
# Only where vLLM imports (an optional dependency; the GPU machines need its wheel carried): otherwise a summary line
# says so and the check goes on. Tiny shapes: the smallest sizes (the figures only prove the path runs).
if [ "$SHAPES" = tiny ]; then   # the CPU path of CI: the vLLM path is tested by tests/test_vllm_*.py
    note "rollout engines: skipped at tiny shapes (run benchmarks/rollout_engines.py)"
    STEP_TIMES+=("rollouts 0")
elif "$PY" -c "import vllm" >/dev/null 2>&1; then
    step rollouts 240 "$PY" benchmarks/rollout_engines.py   # 16 prompts of 32-128 tokens, 64 new, 4-layer Qwen2
    keep rollouts '^(model: Qwen2|rollout engines:)'
else
    note "rollout engines: vLLM not installed (skipped)"
    STEP_TIMES+=("rollouts 0")
fi

if [ "$GPU" = 1 ] && [ $((SECONDS - START)) -gt $BUDGET ]; then
    note "over budget: $((SECONDS - START)) s > $BUDGET s"
fi
if [ -n "$FAILED" ]; then
    STATUS="FAILED: $FAILED"
    exit 1
fi
exit 0   # the summary (OK) and the clean-up: finish, the EXIT trap
