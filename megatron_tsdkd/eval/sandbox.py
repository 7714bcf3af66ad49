"""Run untrusted generated code (MBPP) in a child process: a wall-clock timeout, a CPU-time and memory cap
(resource.setrlimit), no network, an empty environment and a throw-away working folder.

A crash, a hang, a MemoryError or a blocked network call scores the sample as failed; nothing of it reaches the
evaluation. No network: the child first tries to enter a new network namespace (unshare(CLONE_NEWNET), which
needs root or unprivileged user namespaces); where the kernel refuses, the socket module is disabled inside the
child before the program runs (a best-effort guard: code that loads a C socket library by hand is not stopped).

``pass_at_1(references, predictions)`` has the signature of lm-eval's mbpp metric (tasks/mbpp/utils.py), which
calls Hugging Face ``evaluate``'s ``code_eval``: that one is downloaded from the hub at import time and needs
HF_ALLOW_CODE_EVAL=1, so our pipeline replaces it with this runner (harness_tasks.py).
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Union

TIMEOUT_S = float(os.environ.get("TSDKD_SANDBOX_TIMEOUT", "10"))
MEMORY_MB = 1024

_PRELUDE = r'''
import ctypes, sys
try:
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:   # CLONE_NEWNET
        raise OSError
except Exception:
    import socket
    def _blocked(*a, **k):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.getaddrinfo = _blocked
sys.modules.pop("ctypes", None)
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str          # "passed", "failed: <last line of stderr>", "timeout after Ns", "killed by signal N"


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        os.setsid()
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024 * 1024, 10 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(program: str, timeout_s: float | None = None, memory_mb: int = MEMORY_MB) -> SandboxResult:
    """Run ``program`` (the solution followed by its asserts); passed when it exits 0 within the limits."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="tsdkd-sandbox-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w") as f:
            f.write(_PRELUDE + "\n" + program + "\n")
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", path], cwd=folder, env={"PATH": "/usr/bin:/bin"},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=_limits(memory_mb, int(timeout_s) + 1))
        except OSError as error:
            return SandboxResult(False, f"failed to start: {error}")
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                proc.kill()
            proc.communicate()
            return SandboxResult(False, f"timeout after {timeout_s:g}s")
    if proc.returncode == 0:
        return SandboxResult(True, "passed")
    if proc.returncode < 0:
        return SandboxResult(False, f"killed by signal {-proc.returncode}")
    last = (err.decode(errors="replace").strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
    return SandboxResult(False, f"failed: {last[:200]}")


def pass_at_1(references: Union[str, list], predictions: Union[str, list]) -> float:
    """lm-eval's mbpp metric contract: the fraction of (prediction, tests) pairs whose program passes."""
    if isinstance(references, str):
        references = [references]
    if isinstance(predictions[0], str):
        predictions = [[p] for p in predictions]
    results = [run_program(candidates[0] + "\n" + tests).passed for candidates, tests in zip(predictions, references)]
    return sum(results) / len(results)
