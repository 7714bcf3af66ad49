"""``python -m megatron_tsdkd.runtime.torchrun [torchrun arguments]``: torchrun whose stop signals reach the workers
as signals, not as a shutdown. slurm/launch.sh starts every node's workers through it.

Plain torchrun turns SIGTERM/SIGINT into a shutdown of its workers: ``os.killpg(worker, sig)`` on each worker's
process group (each worker is a session leader), a wait of ``--shutdown-timeout`` seconds (30 by default), then
``os.killpg(worker, SIGKILL)``; and it exits 1 with a SignalException traceback even when every worker stopped
cleanly. SIGUSR1 (Slurm's time-limit warning) it does not handle at all: it dies of it, orphaning its workers.

Here SIGTERM, SIGINT and SIGUSR1 are recorded and passed on to each worker process, and torchrun keeps supervising:
the trainer saves a checkpoint at the end of the current step and exits 0 (engines/preemption.py), torchrun sees
every worker succeed and exits 0 too. Nothing here ever escalates to SIGKILL: Slurm's KillWait or the user does
that, and a worker outliving this agent is ended by runtime/parent_watch.py. A worker still starting up (imports,
model loading) gets the signal as soon as its handler is installed (read off ``SigCgt`` in /proc/<pid>/status), so
a signal that comes early is neither lost nor fatal. SIGHUP and SIGQUIT keep torchrun's own behaviour.

A worker that dies is reported as what it is (runtime/rank_deaths.py): ``DeathWatch`` learns each worker's exit
status the moment it dies and leaves a death note for its peers, which name it as the cause of their own failure
instead of the collective error they get; and after torchrun's failure table comes one line per worker killed by a
signal: which rank, which signal, and the likely cause (the OOM killer, with the node's memory figures).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from megatron_tsdkd.runtime import rank_deaths

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TORCHRUN_OWN = "SIGHUP,SIGQUIT"   # TORCHELASTIC_SIGNALS_TO_HANDLE: torchrun may still shut down on these
POLL_SECONDS = 0.2
CENSUS_SECONDS = 0.25   # how often DeathWatch lists the workers and samples the node's memory


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


def _worker_facts(pid: int) -> dict | None:
    """A worker's ranks, run and GPU, read off its environment while it lives (a dead one has none to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None

    def number(key: bytes):
        value = env.get(key, b"")
        return int(value) if value.isdigit() else None

    local = number(b"LOCAL_RANK")
    visible = env.get(b"CUDA_VISIBLE_DEVICES", b"").decode(errors="replace").split(",")
    gpu = int(visible[local]) if local is not None and local < len(visible) and visible[local].isdigit() else local
    return {"rank": number(b"RANK"), "local_rank": local, "gpu": gpu,
            "run": env.get(b"TORCHELASTIC_RUN_ID", b"").decode(errors="replace") or None}


class DeathWatch:
    """Two daemon threads: a census (every CENSUS_SECONDS: the workers' ranks while they live, the node's memory)
    and a watch that learns each worker's exit the moment it happens, through ``waitid(WNOWAIT)``: the worker stays
    a zombie for torchrun to reap as before. A worker that does not exit 0 leaves a death note in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.memory = rank_deaths.MemoryWatch()
        self.workers: dict[int, dict] = {}   # pid -> _worker_facts
        self.notes: dict[int, dict] = {}     # pid -> its death note
        self.lock = threading.Lock()         # the watch and, at the end, the summary write notes

    def start(self) -> "DeathWatch":
        threading.Thread(target=self._census, name="worker-census", daemon=True).start()
        threading.Thread(target=self._watch, name="worker-deaths", daemon=True).start()
        return self

    def _census(self) -> None:
        while True:
            self.memory.sample()
            for pid in _children():
                if pid not in self.workers:
                    facts = _worker_facts(pid)
                    if facts is not None and facts["rank"] is not None:   # between fork and exec: the agent's
                        self.workers[pid] = facts                          # environment, no RANK yet; look again
            time.sleep(CENSUS_SECONDS)

    def _watch(self) -> None:
        seen: set[int] = set()
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:   # no worker yet (or none left)
                time.sleep(CENSUS_SECONDS)
                continue
            if info is None or info.si_pid in seen:   # a zombie torchrun has yet to reap
                time.sleep(0.02)
                continue
            seen.add(info.si_pid)
            killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            if killed or info.si_status != 0:
                self.died(info.si_pid, info.si_status if killed else None, None if killed else info.si_status)

    def died(self, pid: int, signal_number: int | None, exit_code: int | None, rank=None, local_rank=None) -> dict:
        """Write (once) and return the death note of worker ``pid``."""
        with self.lock:
            if pid in self.notes:
                note = self.notes[pid]
                if note["rank"] is None and rank is not None:   # torchrun's record names a rank the watch missed
                    note.update(rank=rank, local_rank=local_rank)
                    self._write(note)
                return note
            facts = self.workers.get(pid, {})
            note = rank_deaths.death_note(
                rank=facts.get("rank", rank), local_rank=facts.get("local_rank", local_rank), pid=pid,
                signal_number=signal_number, exit_code=exit_code, run=facts.get("run"),
                memory=self.memory.figures(facts.get("gpu")))
            self.notes[pid] = note
            self._write(note)
            return note

    def _write(self, note: dict) -> None:
        try:
            rank_deaths.write_note(self.folder, note)
        except OSError as error:
            print(f"torchrun: could not write the death note of worker {note['pid']} to {self.folder}: {error}",
                  file=sys.stderr, flush=True)

    def summary(self, failures: dict) -> list[str]:
        """One line per worker killed by a signal (torchrun's ``ChildFailedError.failures``: global rank ->
        ProcessFailure), the first death first; a later one is put down to torchrun's stopping of the others."""
        for rank, failure in failures.items():   # a death the watch missed (or a rank it could not read): its
            if failure.exitcode is not None and failure.exitcode < 0:   # note comes from torchrun's record
                self.died(failure.pid, -failure.exitcode, None, rank=rank, local_rank=failure.local_rank)
        deaths = sorted(self.notes.values(), key=lambda note: note["time"])
        first = deaths[0] if deaths else None
        lines = []
        for note in deaths:
            if not note.get("signal"):
                continue   # a worker that exited with an error code printed its error itself
            if note is not first and note["signal"] in ("SIGTERM", "SIGKILL"):
                culprit = f"rank {first['rank']}" if first.get("rank") is not None else f"worker {first['pid']}"
                lines.append(f"torchrun: {rank_deaths.who(note)} was killed by {note['signal']} after {culprit} had "
                             f"{'died' if first.get('signal') else 'failed'} (torchrun stops the other workers: "
                             f"SIGTERM, then SIGKILL after its shutdown timeout)")
            else:
                lines.append(f"torchrun: {rank_deaths.describe(note)}")
        return lines


def _notes_folder() -> tuple[str, bool]:
    """Where the death notes go, and whether it is a private folder to remove at exit: TSDKD_DEATH_NOTES if set;
    else under the launcher's log folder (on most clusters a shared file system: ranks on other nodes read the notes
    too), one folder per Slurm restart; else a private temporary folder."""
    if os.environ.get(rank_deaths.NOTES_ENV):
        return os.environ[rank_deaths.NOTES_ENV], False
    if os.environ.get("TSDKD_RUN_LOG_DIR"):
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        return os.path.join(os.environ["TSDKD_RUN_LOG_DIR"], "death-notes", f"restart-{restart}"), False
    return tempfile.mkdtemp(prefix="tsdkd-death-notes-"), True


def main() -> None:
    forwarder = Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forwarder.handle)
    threading.Thread(target=forwarder.run, name="signal-forwarder", daemon=True).start()
    folder, private = _notes_folder()
    os.environ[rank_deaths.NOTES_ENV] = folder   # the workers inherit it
    watch = DeathWatch(folder).start()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import main as torchrun_main

    # torchrun installs a handler for each signal of this list, replacing ours; its --signals-to-handle option
    # (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) overwrites TORCHELASTIC_SIGNALS_TO_HANDLE, which older versions read.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_OWN
    if "signals_to_handle" in getattr(LaunchConfig, "__dataclass_fields__", {}):
        sys.argv.insert(1, f"--signals-to-handle={TORCHRUN_OWN}")
    try:
        torchrun_main()
    except ChildFailedError as error:   # torchrun's table (its traceback says nothing more), then the deaths
        print(f"torchrun: {type(error).__name__}:\n{error}", file=sys.stderr, flush=True)
        for line in watch.summary(error.failures):
            print(line, file=sys.stderr, flush=True)
        raise SystemExit(1) from None   # as torchrun's uncaught error would
    finally:
        if private:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
