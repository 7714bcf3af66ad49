"""``python -m megatron_tsdkd.runtime.torchrun [torchrun arguments]``: torchrun whose stop signals reach the workers
as signals, not as a shutdown. slurm/launch.sh starts every node's workers through it.

Plain torchrun turns SIGTERM/SIGINT into a shutdown of its workers: ``os.killpg(worker, sig)`` on each worker's
process group (each worker is a session leader), a wait of ``--shutdown-timeout`` seconds (30 by default), then
``os.killpg(worker, SIGKILL)``; and it exits 1 with a SignalException traceback even when every worker stopped
cleanly. SIGUSR1 (Slurm's time-limit warning) it does not handle at all: it dies of it, orphaning its workers.

Here SIGTERM, SIGINT and SIGUSR1 are recorded and passed on to each worker process, and torchrun keeps supervising:
the trainer saves a checkpoint at the end of the current step and exits 0 (training/preemption.py), torchrun sees
every worker succeed and exits 0 too. Nothing here ever escalates to SIGKILL: Slurm's KillWait or the user does
that, and a worker outliving this agent is ended by runtime/parent_watch.py. A worker still starting up (imports,
model loading) gets the signal as soon as its handler is installed (read off ``SigCgt`` in /proc/<pid>/status), so
a signal that comes early is neither lost nor fatal. SIGHUP and SIGQUIT keep torchrun's own behaviour.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TORCHRUN_OWN = "SIGHUP,SIGQUIT"   # TORCHELASTIC_SIGNALS_TO_HANDLE: torchrun may still shut down on these
POLL_SECONDS = 0.2


def _children() -> list[int]:
    """PIDs of this process's direct children (torchrun's only children are its workers)."""
    me = os.getpid()
    if os.path.isdir("/proc/self/task"):
        pids = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pids = None
                break
        if pids is not None:
            return pids
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return found
    try:
        import psutil

        return [p.pid for p in psutil.Process(me).children()]
    except Exception:  # noqa: BLE001 - no way to list them: nothing to forward to
        return []


def _takes(pid: int, sig: int) -> bool:
    """Whether ``pid`` takes ``sig`` now: a handler installed, or blocked (it stays pending until the block ends,
    as during a checkpoint write). False while it would die of it or ignore it; True where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigCgt:", "SigBlk:"))]
    except (OSError, ValueError, IndexError):
        return not os.path.isdir("/proc/self")
    return any(mask >> (sig - 1) & 1 for mask in masks)


class Forwarder:
    """Signal handler (main thread: records) plus a daemon thread that delivers each kind of signal received once
    to every worker, as soon as that worker takes it."""

    def __init__(self):
        self.received: list[int] = []
        self.wake = threading.Event()

    def handle(self, signum, frame) -> None:
        self.received.append(signum)
        self.wake.set()

    def run(self) -> None:
        delivered: set[tuple[int, int]] = set()   # (pid, signal): each kind of signal once per worker is enough
        while True:
            self.wake.wait(POLL_SECONDS if self._undelivered(delivered) else None)
            self.wake.clear()
            for sig in dict.fromkeys(self.received):
                for pid in _children():
                    if (pid, sig) in delivered or not _takes(pid, sig):
                        continue
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                    delivered.add((pid, sig))
                    print(f"torchrun: passed {signal.Signals(sig).name} on to worker {pid}", file=sys.stderr,
                          flush=True)

    def _undelivered(self, delivered) -> bool:
        pids = _children()
        return any((pid, sig) not in delivered for sig in set(self.received) for pid in pids)


def main() -> None:
    forwarder = Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forwarder.handle)
    threading.Thread(target=forwarder.run, name="signal-forwarder", daemon=True).start()
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import main as torchrun_main

    # torchrun installs a handler for each signal of this list, replacing ours; its --signals-to-handle option
    # (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) overwrites TORCHELASTIC_SIGNALS_TO_HANDLE, which older versions read.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_OWN
    if "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}):
        sys.argv.insert(1, f"--signals-to-handle={TORCHRUN_OWN}")
    torchrun_main()


if __name__ == "__main__":
    main()
