"""benchmarks/gpu_check.sh, the one-command GPU check, runs end to end on the CPU at tiny shapes (so CI keeps the path
alive for the GPU machines): the disk preflight, a synthetic tokenizer, training, export, evaluation and the
throughput benchmark, with every figure in the summary block at the end (about 2 minutes on 2 idle cores); and a
failing step or a disk without room still ends in the summary (a few seconds each: stand-in Python commands)."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900   # generous: other work may share the 2 cores

# Lines of the summary block, each a figure or a check the GPU run reports.
EXPECTED = [
    r"^disk: ~[\d.]+ GiB needed, [\d.]+ GiB free in \S+$",
    r"^vocabulary: tokenizer 1000 tokens \(synthetic byte BPE built in [\d.]+ s\); embedding rows student 1024, "
    r"teacher 1024; losses and sampling over 1000 real of 1024 padded columns \(ours\), the HF-style step over 1024$",
    r"^student accuracy before distillation on \S+: [\d.]+% \(\d+/\d+\)$",
    r"^exported the student as a Hugging Face model to \S+$",
    r"^training finished at step 3$",
    r"^checkpoint: saved at step 3$",
    r"^accuracy of \S+ on \S+: [\d.]+% \(\d+/\d+\)$",
    r"^export: loads with transformers as Qwen2ForCausalLM .* finite; \d+ tensors as the initial student's, "
    r"[\d.]+% of their elements changed by training$",
    r"^training run \(TensorBoard\): loss/total [\d.]+ -> [\d.]+ -> [\d.]+; tokens/s ",
    r"^==== step throughput: tiny ",
    r"^tokens/s: ours \(sdpa\) [\d.]+, ours \(local\) [\d.]+, HF-style [\d.]+; ours \(sdpa\) / HF-style [\d.]+x",
    r"^student fwd/bwd MFU: .*achieved sdpa [\d.]+ GFLOP/s, local [\d.]+ GFLOP/s$",
    r"^peak GPU memory \(sdpa\): n/a on CPU \(peak RSS [\d.]+ GiB\)$",
    r"^planner peak \(sdpa\): [\d.]+ GiB predicted",
    r"^planner peak \(local\): [\d.]+ GiB predicted",
    r"^phase seconds \(ours, sdpa\): rollout [\d.]+, teacher_forward [\d.]+, student_forward [\d.]+, "
    r"student_backward [\d.]+, optimizer [\d.]+, step [\d.]+",
    r"^phase seconds \(ours, local\): rollout ",
    r"^phase seconds \(HF-style\): generate [\d.]+, teacher_forward [\d.]+, ",
    r"^ratio SDPA vs local attention: tokens/s [\d.]+x, student fwd\+bwd time [\d.]+x faster",
]


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "benchmarks", "gpu_check.sh")), reason="no script")
def test_gpu_check_runs_on_cpu_at_tiny_shapes():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # the CPU path, even where a GPU is present
    start = time.monotonic()
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    seconds = time.monotonic() - start
    out = done.stdout + done.stderr
    assert "CHECKPOINT SAVE FAILED" not in out, (
        "the bf16 training run could not save its checkpoint (megatron-core's distributed optimizer, fp32 norm "
        "weights and bf16 weights in one param group):\n" + out[-3000:])
    assert done.returncode == 0, f"gpu_check.sh exited {done.returncode} after {seconds:.0f} s:\n{out[-6000:]}"
    assert "nothing to install" in out   # the venv has megatron-core: no pip on the CPU path
    summary = out.split("================ gpu_check summary: OK ================", 1)
    assert len(summary) == 2, out[-4000:]
    lines = summary[1].split("================ end of gpu_check summary")[0].splitlines()
    missing = [p for p in EXPECTED if not any(re.search(p, line) for line in lines)]
    assert not missing, f"summary lacks {missing}:\n" + "\n".join(lines)


STAND_IN = """#!/usr/bin/env bash
# the venv's Python, except for the command named by STAND_IN_FAIL: it fails as a full disk makes Python fail
case "$*" in
    *"$STAND_IN_FAIL"*) echo "$STAND_IN_OUTPUT"; exit "${STAND_IN_STATUS:-0}";;
    *) exec "$STAND_IN_PYTHON" "$@";;
esac
"""


def _run_failing(tmp_path, fail: str, output: str, status: str):
    tmp_path.mkdir()
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    work = tmp_path / "tmp"
    work.mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TSDKD_PYTHON=str(python), TMPDIR=str(work),
               STAND_IN_PYTHON=os.path.join(REPO, ".venv", "bin", "python"), STAND_IN_FAIL=fail,
               STAND_IN_OUTPUT=output, STAND_IN_STATUS=status)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    left = sorted(name for name in os.listdir(work) if name.startswith("tsdkd_gpu_check"))   # work folders left
    return done, done.stdout.split("================ gpu_check summary: ", 1), left


def test_failures_still_end_in_the_summary(tmp_path):
    """A disk without room stops the check before anything is written, naming the space; a step that dies of a
    full disk (Python's OSError) ends in the summary with its last lines and a disk note."""
    done, parts, left = _run_failing(tmp_path / "a", "--disk-estimate", f"disk_needed_bytes {10**18}", "")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED at disk preflight ====") and left == []
    assert re.search(r"^disk: the check writes ~[\d.]+ GiB \(models, checkpoint, export\), but \S+ has [\d.]+ GiB "
                     r"free and \S+ [\d.]+ GiB; set TMPDIR to a folder with room", summary, re.M), summary

    full = "OSError: [Errno 28] No space left on device: '/models/teacher/model.safetensors'"
    done, parts, left = _run_failing(tmp_path / "b", "--prepare-only", full, "1")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED at models ====") and left == [], (summary, left)   # the work folder removed
    for line in ("step models FAILED with exit code 1; its last lines:", f"    {full}", "disk full? "):
        assert line in summary, (line, summary)
    assert summary.rstrip().endswith("================ end of gpu_check summary ================")
