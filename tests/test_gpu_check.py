"""benchmarks/gpu_check.sh, the one-command GPU check, runs end to end on the CPU at tiny shapes (so CI keeps the path
alive for the GPU machines): training, export, evaluation and the throughput benchmark, with every figure in the
summary block at the end. About 90 s on 2 idle cores."""
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
