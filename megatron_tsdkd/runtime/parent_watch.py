"""End this process when its parent dies: a torchrun worker must never train on without its agent.

torchrun starts every worker in a session of its own (``start_new_session=True``), so when torchrun itself is killed
with SIGKILL (``kill -9``, the OOM killer, a crashed agent) nothing reaches the workers: they keep training, writing
checkpoints and holding the accelerator with nobody to report to, and a restarted job then races them for the same
checkpoint folder. ``end_with_parent()`` closes that gap.

How, and why this way rather than a watchdog thread polling ``os.getppid()``:

* On Linux it asks the kernel: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes. The kernel delivers the signal
  the moment the parent exits, whatever this process is doing: stuck in a collective, in C++ code holding the GIL,
  blocking signals during a checkpoint write. No thread, no polling interval, no cost. A thread would only act when
  it gets the GIL and between bytecodes, and its latency is its polling period.
* SIGKILL, not SIGTERM: a graceful save needs every rank (a collective), the agent that would report and reap the
  exit is gone, and a rank waiting on a dead peer would hang forever with nobody left to kill it. SIGKILL is safe for
  the checkpoints: a save in progress is left as ``step_N.partial`` (never picked up), ``latest`` still names the
  previous complete checkpoint (engines/checkpoint.py), and the next run resumes from there.
* The kernel ties the death signal to the parent *thread* that forked us; torchrun starts its workers from its main
  thread, whose end is torchrun's end, so that caveat does not bite here. Our own children do not inherit it: the
  process that writes an asynchronous checkpoint arms it for itself (engines/checkpoint.py), so a killed trainer
  does not leave it writing on (the file writers it forked finish the file in hand, into ``step_N.partial``).
* A parent that dies between reading ``os.getppid()`` and the prctl call is caught by reading it again after
  arming. One that died earlier (while the worker was still importing, before the trainer arms this) cannot be told
  from a legitimate parent (torchrun may well be PID 1 in a container), so it is not guessed at; such a worker then
  fails to join the process group, whose store lived in the dead agent.

Elsewhere (macOS, for a laptop run of slurm/demo_cpu.sh) it falls back to a daemon thread polling ``os.getppid()``
once a second, which then SIGKILLs this process.

Only armed for workers of a torchelastic agent (torchrun sets ``TORCHELASTIC_RUN_ID``): a single process started by
hand from a shell (``nohup tsdkd-train ... &``) must not die when that shell exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
_armed = False


def _disarmed_in_child() -> None:
    """A forked child is not armed: the kernel clears the death signal on fork, and the watch thread stays behind."""
    global _armed
    _armed = False


os.register_at_fork(after_in_child=_disarmed_in_child)


def under_elastic_agent() -> bool:
    """True in a worker started by torchrun (torch.distributed.run / elastic agent)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _prctl_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    _die()


def end_with_parent(only_under_agent: bool = True) -> bool:
    """Arm once: SIGKILL this process when its parent exits. Returns whether it is armed."""
    global _armed
    if _armed:
        return True
    if only_under_agent and not under_elastic_agent():
        return False
    parent = os.getppid()
    if sys.platform.startswith("linux") and _prctl_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:   # it died between getppid() and prctl(): the kernel will not tell us now
            _die()
    else:
        threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    _armed = True
    return True
