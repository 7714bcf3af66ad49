#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network.
#
#     bash benchmarks/fill_wheels.sh          # on a machine with PyPI; about 3 MB, a few seconds
#
# The GPU machines run Python 3.12 with torch 2.11 (CUDA 13), transformers (so numpy), safetensors, sentencepiece,
# tensorboard, tqdm and pyyaml, but no megatron-core. megatron-core 0.16.1's hard requirements are torch, numpy and
# packaging>=24.2: the wheels are megatron-core itself (a cp312 manylinux build) and packaging (installed there only
# if the machine's is older than 24.2). deepspeed and lm-eval are not needed by the check (nothing on its path
# imports them). The total must stay well inside the device tool's 64 MiB carry limit; this script checks it.
#
# The one command it runs:
#     pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl megatron-core==0.16.1 packaging==26.4
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=("megatron-core==0.16.1" "packaging==26.4")
mkdir -p .whl
"$PY" -m pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl "${WHEELS[@]}"
ls -l .whl
total=$(du -sb .whl | cut -f1)
echo "total $((total / 1024)) KiB in .whl/ (the device tool carries at most 64 MiB in all)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
    echo "error: .whl/ holds more than 48 MiB; remove stale wheels (rm -rf .whl) and run this again" >&2
    exit 1
fi
