#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network.
#
#     bash benchmarks/fill_wheels.sh               # on a machine with PyPI; 2.7 MB, a few seconds
#     bash benchmarks/fill_wheels.sh --deepspeed   # and DeepSpeed for GPU_CHECK_DEEPSPEED=1; ~7.5 MB, ~30 s
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
# The total must stay well inside the device tool's 64 MiB carry limit (the working tree travels too); this script
# checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEEPSPEED=0
[ "${1:-}" = --deepspeed ] && DEEPSPEED=1
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
WHEELS=("megatron-core==0.16.1" "packaging==26.4")
[ "$DEEPSPEED" = 1 ] && WHEELS+=("hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
                                 "typing-inspection==0.4.5")
mkdir -p .whl
"$PY" -m pip download "${PLATFORMS[@]}" --only-binary=:all: --no-deps -d .whl "${WHEELS[@]}"
if [ "$DEEPSPEED" = 1 ] && ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    src=$(mktemp -d)
    "$PY" -m pip download --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
    # --no-build-isolation: its setup.py imports torch, which an isolated build would download (a CUDA build, GBs)
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w .whl "$src"/deepspeed-0.19.8.tar.gz
    rm -rf "$src"
fi
ls -l .whl
total=$(du -sb .whl | cut -f1)
echo "total $((total / 1024)) KiB in .whl/ (the device tool carries at most 64 MiB in all)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
    echo "error: .whl/ holds more than 48 MiB; remove stale wheels (rm -rf .whl) and run this again" >&2
    exit 1
fi
