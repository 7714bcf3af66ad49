"""benchmarks/gpu_check.sh, the one-GPU check, runs end to end on the CPU at tiny shapes (so CI keeps the path alive
for the GPU machines): the disk preflight, a synthetic tokenizer, (a) the placement smoke, (b) the throughput runs at
micro-batch 1 and auto, (c) fp16 steps, (d) asynchronous checkpoints, a preemption, resume=auto and the export,
with every figure in the summary block at the end (1.5-4 minutes on the 2 shared cores); and a failing step or a
disk without room still ends in the summary, failed steps (a)-(d) do not stop the others, and a disk short of room
for the whole teacher keeps fewer of its layers (seconds each: stand-in Python commands)."""
from __future__ import annotations

# lane: pools

import os
import re
import shutil
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900   # generous: other work may share the 2 cores

# Lines of the summary block, each a figure or a check the GPU run reports; a step whose figure is missing fails.
EXPECTED = [
    r"^step seconds: preflight \d+, install \d+, models \d+, placement \d+, throughput \d+, fp16 \d+, train \d+, "
    r"resume \d+, export \d+; total \d+ s",
    r"^disk: ~[\d.]+ GiB needed, [\d.]+ GiB free in \S+$",
    r"^vocabulary: tokenizer 1000 tokens \(synthetic byte BPE built in [\d.]+ s\); embedding rows student 1024, "
    r"teacher 1024; losses and sampling over 1000 real of 1024 padded columns \(ours\), the HF-style step over 1024$",
    *(rf"^made random {name}: [\d.]+M parameters, 2 layers, hidden {hidden}, vocab 1024, bf16, in [\d.]+ s \(written "
      rf"[\d.]+ GiB in [\d.]+ s\) -> \S+/{name}$" for name, hidden in (("student", 64), ("teacher", 128),
                                                                      ("student_ckpt", 64))),
    # (a) placement
    *(rf"^placement: {name} [\d.]+M parameters, \d+ tensors \(parameters, buffers, tensor attributes\), 0 not on cpu; "
      r"loaded in [\d.]+ s$" for name in ("student", "teacher")),
    r"^placement: teacher forward logits \[1, 256, 1024\] on cpu, finite, in [\d.]+ s \(the first call\); device "
    r"memory n/a on CPU$",
    # (b) throughput at micro-batch 1 and auto
    r"^batch\.micro_size=auto: 4, the largest micro-batch the memory plan fits \(FITS",
    r"^==== step throughput: tiny .*, CPU, bf16, batch 4 \(micro 1, 4\), prompt <= 64 \+ 16 new tokens, ",
    r"^tokens/s: ours \(micro 1\) [\d.]+, ours \(micro auto=4\) [\d.]+$",
    r"^student fwd/bwd MFU: n/a \(CPU: .*\); achieved micro 1 [\d.]+ GFLOP/s, micro auto=4 [\d.]+ GFLOP/s$",
    *(rf"^peak GPU memory \({run}\): n/a on CPU \(peak RSS [\d.]+ GiB\)$" for run in ("micro 1", "micro auto=4")),
    *(rf"^planner peak \({run}\): [\d.]+ GiB predicted" for run in ("micro 1", "micro auto=4")),
    *(rf"^phase seconds \(ours, {run}\): rollout [\d.]+, teacher_forward [\d.]+, student_forward [\d.]+, "
      r"student_backward [\d.]+, optimizer [\d.]+, step [\d.]+" for run in ("micro 1", "micro auto=4")),
    *(rf"^steps \({run}, bf16\): loss/total [\d.]+, [\d.]+ \(finite\); updates skipped 0 of 2; loss scale 1 -> 1; "
      r"rollout/logprob_diff " for run in ("micro 1", "micro auto=4")),
    r"^ratio micro auto=4 vs micro 1: tokens/s [\d.]+x, student fwd\+bwd time [\d.]+x faster",
    # (c) fp16
    r"^==== step throughput: tiny .*, CPU, fp16, batch 4 \(micro 4\)",
    r"^steps \(sdpa, fp16\): loss/total [\d.]+, [\d.]+ \(finite\); updates skipped [012] of 2; loss scale "
    r"[\d.e+]+ -> [\d.e+]+",
    # (d) checkpoints, preemption, resume, export
    *(rf"^checkpoint: the save at step {n} blocked training [\d.]+ s \([\d.]+ s of it waiting for the write before; "
      rf"async\)$" for n in (1, 2, 3)),
    *(rf"^checkpoint: step_00000{n} \([\d.]+ GiB\) published [\d.]+ s after its save began$" for n in (1, 2, 3)),
    r"^stopped by a signal at step 2; the checkpoint is in \S+$",
    r"^resumed from \S+/step_000002 at step 2$",
    r"^exported the student as a Hugging Face model to \S+$",
    r"^training finished at step 3$",
    r"^export: loads with transformers as Qwen2ForCausalLM .* finite; \d+ tensors as the initial student's, "
    r"[\d.]+% of their elements changed by training$",
    r"^training runs \(TensorBoard\): loss/total [\d.]+ -> [\d.]+ -> [\d.]+; tokens/s ",
    r"^not checked on one GPU: TP/PP over NCCL",
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
# the venv's Python, except: --disk-estimate prints STAND_IN_DISK when it is set, and a command named by
# STAND_IN_FAIL (unless STAND_IN_PASS names it too) prints STAND_IN_OUTPUT (and its arguments, with STAND_IN_ECHO)
# and exits STAND_IN_STATUS (as a full disk makes Python fail)
case "$*" in
    *--disk-estimate*) if [ -n "${STAND_IN_DISK:-}" ]; then printf '%b\\n' "$STAND_IN_DISK"; exit 0; fi;;
esac
if [ -n "${STAND_IN_PASS:-}" ] && [[ "$*" == *"$STAND_IN_PASS"* ]]; then exec "$STAND_IN_PYTHON" "$@"; fi
case "$*" in
    *"$STAND_IN_FAIL"*) echo "$STAND_IN_OUTPUT${STAND_IN_ECHO:+ (argv: $*)}"; exit "${STAND_IN_STATUS:-0}";;
    *) exec "$STAND_IN_PYTHON" "$@";;
esac
"""


def _run_failing(tmp_path, fail: str, output: str, status: str, **env_vars):
    tmp_path.mkdir()
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    work = tmp_path / "tmp"
    work.mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TSDKD_PYTHON=str(python), TMPDIR=str(work),
               STAND_IN_PYTHON=os.path.join(REPO, ".venv", "bin", "python"), STAND_IN_FAIL=fail,
               STAND_IN_OUTPUT=output, STAND_IN_STATUS=status, **env_vars)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    left = sorted(name for folder in (work, REPO) for name in os.listdir(folder)
                  if name.startswith("tsdkd_gpu_check"))   # work folders left behind
    return done, done.stdout.split("================ gpu_check summary: ", 1), left


def test_failures_still_end_in_the_summary(tmp_path):
    """A disk without room stops the check before anything is written, naming the space; a step that dies of a
    full disk (Python's OSError) ends in the summary with its last lines and a disk note."""
    done, parts, left = _run_failing(tmp_path / "a", "--disk-estimate", f"disk_needed_bytes {10**18}", "")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED at disk preflight ====") and left == []
    assert re.search(r"^disk: the check writes ~[\d.]+ GiB \(models, checkpoints, export\), but \S+ has [\d.]+ GiB "
                     r"free and \S+ [\d.]+ GiB; set TMPDIR to a folder with room", summary, re.M), summary

    full = "OSError: [Errno 28] No space left on device: '/models/teacher/model.safetensors'"
    done, parts, left = _run_failing(tmp_path / "b", "--prepare-only", full, "1")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED at models ====") and left == [], (summary, left)   # the work folder removed
    for line in ("step models FAILED with exit code 1; its last lines:", f"    {full}", "disk full? "):
        assert line in summary, (line, summary)
    assert summary.rstrip().endswith("================ end of gpu_check summary ================")


def test_a_disk_short_of_room_keeps_fewer_teacher_layers(tmp_path):
    """At real shapes, a disk with room for the check less 2.5 teacher layers keeps 25 of the teacher's 28 layers
    (the estimate is a stand-in's: 1 GiB a layer) rather than stopping; the summary says so."""
    gib = 2**30
    free = max(shutil.disk_usage(folder).free for folder in (tmp_path, REPO))   # the script takes the roomier
    estimate = (f"disk_needed_bytes {free + 5 * gib // 2}\\ndisk_teacher_layer_bytes {gib}\\nteacher_layers 28\\n"
                "teacher_layers_all 28")
    done, parts, left = _run_failing(tmp_path / "c", "--prepare-only", "stand-in: no models", "1",
                                     GPU_CHECK_SHAPES="qwen2.5-1.5b/7b", STAND_IN_DISK=estimate, STAND_IN_ECHO="1")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED at models ====") and left == [], (summary, left)
    assert re.search(r"^disk: 28 teacher layers need ~[\d.]+ GiB but \S+ has [\d.]+ GiB free: the teacher keeps 25 "
                     r"layers$", summary, re.M), summary
    assert re.search(r"^machine: CPU; .*; shapes qwen2\.5-1\.5b/7b \(student all layers, teacher 25 of 28\)$", summary,
                     re.M), summary
    assert "--teacher-layers 25 " in summary, summary   # the models are written with 25 layers


def test_failed_steps_do_not_stop_the_others(tmp_path):
    """Steps (a)-(d) fail (every command on the work folder but the models' fails at once): each is named with its
    last lines, the check goes on to the next, and it ends FAILED naming them all, the resume not started."""
    done, parts, left = _run_failing(tmp_path / "d", "/tsdkd_gpu_check.", "stand-in: this step fails", "3",
                                     STAND_IN_PASS="--prepare-only")
    assert done.returncode == 1 and len(parts) == 2, done.stdout + done.stderr
    summary = parts[1]
    assert summary.startswith("FAILED: placement throughput fp16 train ====") and left == [], (summary, left)
    for name in ("placement", "throughput", "fp16", "train"):
        assert f"step {name} FAILED with exit code 3; its last lines:" in summary, (name, summary)
    assert "step resume" not in summary and "step export" not in summary, summary
    assert re.search(r"^step seconds: preflight \d+, install \d+, models \d+, placement \d+, throughput \d+, "
                     r"fp16 \d+, train \d+; total", summary, re.M), summary
