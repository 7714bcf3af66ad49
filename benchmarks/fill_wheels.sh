#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network.
#
#     bash benchmarks/fill_wheels.sh               # on a machine with PyPI; 2.7 MB, a few seconds
#     bash benchmarks/fill_wheels.sh --deepspeed   # and DeepSpeed for GPU_CHECK_DEEPSPEED=1; ~7.5 MB, ~30 s
#     bash benchmarks/fill_wheels.sh [--deepspeed] --check DIR   # no download: only the check below, on DIR
#
# The GPU machines run Python 3.12 with torch 2.11 (CUDA 13), transformers (so numpy), safetensors, sentencepiece,
# tensorboard, filelock, tqdm and pyyaml, but no megatron-core. megatron-core 0.16.1's hard requirements are torch,
# numpy and packaging>=24.2: the wheels are megatron-core itself (a cp312 manylinux build) and packaging (installed
# there only if the machine's is older than 24.2). Transformer Engine is never carried (the job refuses it: megatron's
# optimizer would be TE's FusedAdam), nor vLLM (its CUDA build pins torch 2.13 and is far over the 64 MiB limit).
#
# DeepSpeed (--deepspeed). PyPI has only DeepSpeed's source archive, no wheel. This script builds a pure-Python wheel
# from it with the local torch (DS_BUILD_OPS=0: no op is compiled now; an op compiles on first use, and
# engine=deepspeed's default optimizer, torch_adam, uses none), so it installs offline without building anything;
# and it adds the requirements the GPU image lacks: hjson, pydantic, pydantic-core (cp312 manylinux), annotated-types,
# typing-inspection (einops, msgpack, ninja, psutil, py-cpuinfo, numpy, tqdm are there).
#
# The check: every wheel the GPU machine will install is in the folder (by name and version, and the DeepSpeed one
# with --deepspeed), and the total stays well inside the device tool's 64 MiB carry limit (the working tree travels
# too). --check DIR runs only the check, on DIR, without the network: tests/test_benchmarks.py runs it on folders of
# stand-in files, so the part that decides whether .whl/ is usable stays tested where PyPI cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEEPSPEED=0
CHECK=
while [ $# -gt 0 ]; do
    case "$1" in
        --deepspeed) DEEPSPEED=1 ;;
        --check) CHECK=${2:?--check needs a folder}; shift ;;
        *) echo "usage: $0 [--deepspeed] [--check DIR]" >&2; exit 2 ;;
    esac
    shift
done
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
WHEELS=("megatron-core==0.16.1" "packaging==26.4")
[ "$DEEPSPEED" = 1 ] && WHEELS+=("hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
                                 "typing-inspection==0.4.5")
EXPECTED=("${WHEELS[@]}")
[ "$DEEPSPEED" = 1 ] && EXPECTED+=("deepspeed==0.19.8")

check() {   # the folder's wheels and total size; exit 1 with what is wrong
    local dir=$1 spec name missing=()
    for spec in "${EXPECTED[@]}"; do   # a wheel's file name: the project's name with _ for -, then its version
        name=${spec%%==*}
        compgen -G "$dir/${name//-/_}-${spec##*==}-*.whl" >/dev/null || missing+=("${name//-/_}-${spec##*==}-*.whl")
    done
    ls -l "$dir"
    total=$(du -sb "$dir" | cut -f1)
    echo "total $((total / 1024)) KiB in $dir (the device tool carries at most 64 MiB in all)"
    if [ ${#missing[@]} -gt 0 ]; then
        echo "error: $dir lacks ${missing[*]}" >&2
        exit 1
    fi
    if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
        echo "error: $dir holds more than 48 MiB; remove stale wheels (rm -rf $dir) and run this again" >&2
        exit 1
    fi
    echo "ok: ${#EXPECTED[@]} wheels (${EXPECTED[*]}) in $dir"
}

if [ -n "$CHECK" ]; then
    check "$CHECK"
    exit 0
fi
mkdir -p .whl
"$PY" -m pip download "${PLATFORMS[@]}" --only-binary=:all: --no-deps -d .whl "${WHEELS[@]}"
if [ "$DEEPSPEED" = 1 ] && ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    src=$(mktemp -d)
    "$PY" -m pip download --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
    # --no-build-isolation: its setup.py imports torch, which an isolated build would download (a CUDA build, GBs)
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w .whl "$src"/deepspeed-0.19.8.tar.gz
    rm -rf "$src"
fi
check .whl
