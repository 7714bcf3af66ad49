"""A rank that dies is reported as what it is: which rank, which signal and the likely cause (the kernel's
out-of-memory killer, with the node's memory figures), not as the collective error its peers see next.

When the OOM killer (or Slurm, or a user) SIGKILLs one worker, the others fail a moment later in a collective (gloo:
"Connection closed/reset by peer"; NCCL: "remote process exited", or a timeout) and report that, or what the code
around the collective makes of it (the vLLM wrapper: "the replica failed while loading the new weights; set
rollout.engine=megatron"): the wrong cause and the wrong advice. Two sides meet here:

* the agent (runtime/torchrun.py) learns each worker's exit status the moment it dies and, for one that did not exit
  0, writes a death note (``death_note``: rank, pid, node, signal or exit code, the node's memory before the death,
  the OOM kills counted since the job started) into the folder that ``TSDKD_DEATH_NOTES`` names; its summary line
  for a killed worker is ``describe(note)``;
* a failing worker calls ``explain_failure(error)``: the notes of its peers, else the peers it learnt at start-up
  (``remember_peers``: node, pid and start time of every rank, so that a dead one on this node is seen without any
  agent, under plain torchrun too). When the error looks like a lost peer or a peer on this node is gone, it waits
  up to a few seconds for the note, which lands a moment after the survivor's error. It returns one line naming the
  dead rank, with this rank's own error as the consequence, or None at once when nothing points at a peer.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections import deque
from typing import Optional

from megatron_tsdkd.runtime.atomic_files import write_json_atomic
from megatron_tsdkd.runtime.collectives import all_gather_objects

NOTES_ENV = "TSDKD_DEATH_NOTES"
WAIT_SECONDS = 3.0          # how long a survivor waits for its peer's note (the agent writes it within milliseconds)
POLL_SECONDS = 0.01          # fast enough to catch a killed peer on this node as a zombie, before it is reaped
MEMORY_WINDOW_SECONDS = 10.0
GIB = 1024 ** 3

# Errors a rank gets when a peer vanishes: a closed connection says so (a generic line is given even without a
# note); a timeout or a distributed error may be one, so it is worth waiting for a note, not worth claiming one.
_LOST_PEER = re.compile(r"connection (closed|reset) by peer|broken pipe|remote process exited|ncclRemoteError|"
                        r"communicator was aborted", re.IGNORECASE)
_MAYBE_LOST_PEER = re.compile(r"timed? ?out|timeout|watchdog|DistNetworkError|DistBackendError|DistStoreError",
                              re.IGNORECASE)
_SOURCE_LOCATION = re.compile(r"^\[[^\]\s]+:\d+\] ")
_CRASHES = {"SIGSEGV": "a crash in native code (segmentation fault: a library, driver or extension bug)",
            "SIGBUS": "a crash in native code (bus error: often a full /dev/shm or a truncated memory-mapped file)",
            "SIGABRT": "an abort in native code (a failed C++ check or assertion; its output ends with it)",
            "SIGILL": "an illegal instruction (a library built for another CPU)",
            "SIGFPE": "an arithmetic fault in native code"}
_STOPS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


# ---------------------------------------------------------------------------------------------------------------
# the node's memory


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _keyed(text: Optional[str]) -> dict[str, int]:
    """``key value`` (or ``key: value kB``) lines as integers."""
    found = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            found[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return found


def _memory_cgroup() -> Optional[tuple[str, int]]:
    """This process's memory cgroup folder and its cgroup version (a Slurm job's limit lives there)."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            for folder in (f"/sys/fs/cgroup/memory{path}", "/sys/fs/cgroup/memory"):
                if os.path.exists(f"{folder}/memory.oom_control"):
                    return folder, 1
        elif controllers == "" and os.path.exists(f"/sys/fs/cgroup{path}/memory.events"):
            return f"/sys/fs/cgroup{path}".rstrip("/"), 2
    return None


def oom_kills() -> dict[str, Optional[int]]:
    """How many processes the kernel's OOM killer has killed so far, on this node and in this cgroup (None where
    unreadable)."""
    cgroup = _memory_cgroup()
    in_cgroup = None
    if cgroup:
        folder, version = cgroup
        in_cgroup = _keyed(_read(f"{folder}/{'memory.oom_control' if version == 1 else 'memory.events'}")).get(
            "oom_kill")
    return {"node": _keyed(_read("/proc/vmstat")).get("oom_kill"), "cgroup": in_cgroup}


def _cgroup_memory() -> Optional[dict[str, int]]:
    """The memory cgroup's limit, use and peak in bytes, where it has a limit below the node's memory."""
    cgroup = _memory_cgroup()
    if not cgroup:
        return None
    folder, version = cgroup
    names = (("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes") if version == 1 else
             ("memory.max", "memory.current", "memory.peak"))
    values = [(_read(f"{folder}/{name}") or "").strip() for name in names]
    total = _keyed(_read("/proc/meminfo")).get("MemTotal", 0)
    if not values[0].isdigit() or not total or int(values[0]) >= total:
        return None
    return {"limit": int(values[0]), **{key: int(v) for key, v in zip(("used", "peak"), values[1:]) if v.isdigit()}}


def _nvml():
    """pynvml, initialised, where it imports and finds a driver; else None (then no GPU figures)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no pynvml, no driver: the GPU figures are simply omitted
        return None


class MemoryWatch:
    """The node's memory sampled over the last seconds, and the OOM kill counters at its start: at a death by the
    OOM killer the victim's memory is already free again, so the figure that tells is the lowest before it."""

    def __init__(self, window: float = MEMORY_WINDOW_SECONDS):
        self.window = window
        self.oom_at_start = oom_kills()
        self.samples: deque = deque()   # (monotonic time, MemAvailable bytes, {GPU index: used bytes})
        self.nvml = _nvml()
        self.gpu_totals: dict[int, int] = {}

    def sample(self) -> None:
        now = time.monotonic()
        available = _keyed(_read("/proc/meminfo")).get("MemAvailable")
        gpus = {}
        if self.nvml is not None:
            try:
                for index in range(self.nvml.nvmlDeviceGetCount()):
                    info = self.nvml.nvmlDeviceGetMemoryInfo(self.nvml.nvmlDeviceGetHandleByIndex(index))
                    gpus[index] = info.used
                    self.gpu_totals[index] = info.total
            except Exception:  # noqa: BLE001 - a driver hiccup costs one sample, not the agent
                pass
        self.samples.append((now, available, gpus))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def figures(self, gpu: Optional[int] = None) -> dict:
        """The memory figures of a death now: the host's (and the cgroup's) memory, its lowest in the window, the OOM
        kills since the start, and GPU ``gpu``'s peak use in the window where known."""
        info = _keyed(_read("/proc/meminfo"))
        now = oom_kills()
        lows = [a for _, a, _ in self.samples if a is not None]
        figures = {"available": info.get("MemAvailable"), "total": info.get("MemTotal"),
                   "lowest_available": min(lows) if lows else None, "window_s": self.window,
                   "oom_kills": {key: (now[key] - self.oom_at_start[key]
                                       if now[key] is not None and self.oom_at_start[key] is not None else None)
                                 for key in now},
                   "cgroup": _cgroup_memory()}
        used = [g[gpu] for _, _, g in self.samples if gpu in g]
        if gpu is not None and used and gpu in self.gpu_totals:
            figures["gpu"] = {"index": gpu, "peak_used": max(used), "total": self.gpu_totals[gpu]}
        return figures


# ---------------------------------------------------------------------------------------------------------------
# death notes


def death_note(*, rank: Optional[int], local_rank: Optional[int], pid: int, signal_number: Optional[int] = None,
               exit_code: Optional[int] = None, memory: Optional[dict] = None, run: Optional[str] = None,
               host: Optional[str] = None) -> dict:
    """What a death note holds (JSON): who died, of what, when, and the memory figures around it."""
    return {"rank": rank, "local_rank": local_rank, "pid": pid, "host": host or socket.gethostname(),
            "signal": _signal_name(signal_number) if signal_number else None, "exit_code": exit_code,
            "time": time.time(), "run": run, "memory": memory or {}}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:   # a real-time signal
        return f"signal {number}"


def write_note(folder: str, note: dict) -> str:
    path = os.path.join(folder, f"{note['host']}.pid-{note['pid']}.json")
    write_json_atomic(path, note)
    return path


def read_notes(folder: Optional[str]) -> list[dict]:
    notes = []
    try:
        names = sorted(os.listdir(folder)) if folder else []
    except OSError:
        return []
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    notes.append(json.load(f))
            except (OSError, ValueError):
                pass   # a note of another writer in progress (atomic rename: not ours) or damaged
    return notes


# ---------------------------------------------------------------------------------------------------------------
# wording


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _memory_text(memory: dict) -> str:
    parts = []
    if memory.get("available") is not None and memory.get("total"):
        text = f"host memory available {_gib(memory['available'])} of {_gib(memory['total'])} GiB at its death"
        if memory.get("lowest_available") is not None:
            text += f", lowest {_gib(memory['lowest_available'])} GiB in the {memory['window_s']:.0f} s before"
        parts.append(text)
    cgroup = memory.get("cgroup")
    if cgroup and "peak" in cgroup:
        parts.append(f"the job's cgroup peaked at {_gib(cgroup['peak'])} of its {_gib(cgroup['limit'])} GiB limit")
    gpu = memory.get("gpu")
    if gpu:
        parts.append(f"GPU {gpu['index']} used up to {_gib(gpu['peak_used'])} of {_gib(gpu['total'])} GiB")
    return "; ".join(parts)


def likely_cause(note: dict) -> str:
    """Why the process of ``note`` most likely got its signal, with the memory figures that say so."""
    name, memory = note.get("signal"), note.get("memory") or {}
    kills = {k: v for k, v in (memory.get("oom_kills") or {}).items() if v is not None}
    figures = _memory_text(memory)
    if name == "SIGKILL":
        if any(kills.values()):
            counted = " and ".join(f"{v} {'on its node' if k == 'node' else 'in the job cgroup'}"
                                   for k, v in kills.items() if v)
            return (f"likely the kernel's out-of-memory killer (OOM kills since the job started: {counted}"
                    f"{'; ' + figures if figures else ''})")
        if kills:
            return (f"not the kernel's out-of-memory killer (no OOM kill on its node since the job started"
                    f"{'; ' + figures if figures else ''}): a user, Slurm (a cancel, a time limit, KillWait after a"
                    f" stop signal) or another supervisor")
        return f"the out-of-memory killer, a user or Slurm (the OOM kill counters are unreadable here" \
               f"{'; ' + figures if figures else ''})"
    if name in _CRASHES:
        return _CRASHES[name]
    if name in _STOPS:
        return "a stop signal it had no handler for at that moment (a user, Slurm, or torchrun stopping its workers)"
    return f"an unhandled {name}" if name else "unknown"


def who(note: dict) -> str:
    """``rank 1 (local rank 1, pid 1234 on node n1)``."""
    where = [f"local rank {note['local_rank']}"] if note.get("local_rank") is not None else []
    where.append(f"pid {note['pid']} on node {note.get('host') or '?'}")
    name = f"rank {note['rank']}" if note.get("rank") is not None else "a worker"
    return f"{name} ({', '.join(where)})"


def describe(note: dict) -> str:
    """One sentence about one death: who, of what, and why."""
    if note.get("signal"):
        return f"{who(note)} was killed by {note['signal']}: {likely_cause(note)}"
    if note.get("exit_code") is not None:
        return f"{who(note)} exited with code {note['exit_code']} (its own error is in its output)"
    kills = (note.get("memory") or {}).get("oom_kills") or {}
    oom = f"; the kernel's OOM killer ran {kills['node']} time(s) on its node since the job started" \
        if kills.get("node") else ""
    return f"{who(note)} had ended before this rank failed (torchrun's summary gives its exit status){oom}"


# ---------------------------------------------------------------------------------------------------------------
# the failing rank's side

_peers: list[dict] = []                               # every rank's node, pid and start time (remember_peers)
_oom_at_init: dict[str, Optional[int]] = {}


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat from the state on (field 3 at index 0); None if the process is gone."""
    text = _read(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if text else None


def _start_ticks(pid: int) -> Optional[int]:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _started_at() -> float:
    """This process's start, in seconds since the epoch (notes from before it belong to an earlier run)."""
    btime = _keyed(_read("/proc/stat")).get("btime")
    ticks = _start_ticks(os.getpid())
    return btime + ticks / os.sysconf("SC_CLK_TCK") if btime and ticks is not None else 0.0


def remember_peers() -> None:
    """Learn every rank's node, pid and start time, and this node's OOM kill counters (collective, once at
    start-up): a peer on this node that vanishes is then found without an agent's note."""
    global _peers, _oom_at_init
    import torch.distributed as dist

    _oom_at_init = oom_kills()
    me = {"rank": dist.get_rank(), "host": socket.gethostname(), "pid": os.getpid(),
          "start": _start_ticks(os.getpid())}
    _peers = all_gather_objects(me)


def _dead_local_peer(me: Optional[int]) -> Optional[dict]:
    """A note for the first remembered peer on this node that is no longer running: its signal or exit code while
    it waits to be reaped (/proc/<pid>/stat's exit code), else only that it is gone. A clean exit (0) is no death."""
    host = socket.gethostname()
    for peer in _peers:
        if peer["rank"] == me or peer["host"] != host:
            continue
        fields = _proc_stat(peer["pid"])
        ours = fields is not None and len(fields) > 49 and int(fields[19]) == peer["start"]   # not a reused pid
        if ours and fields[0] not in "ZX":
            continue   # alive
        status = int(fields[49]) if ours else None   # as waitpid reports it
        if status == 0:
            continue
        note = death_note(rank=peer["rank"], local_rank=None, pid=peer["pid"], host=host)
        if status is not None:
            note["signal"] = _signal_name(status & 0x7F) if status & 0x7F else None
            note["exit_code"] = None if status & 0x7F else status >> 8
        now = oom_kills()
        note["memory"] = {"oom_kills": {k: now[k] - _oom_at_init[k] for k in now
                                        if now[k] is not None and _oom_at_init.get(k) is not None}}
        return note
    return None


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or during, outermost first."""
    found = []
    while error is not None and error not in found and len(found) < 8:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def _lost_peer(error: BaseException) -> tuple[Optional[str], BaseException]:
    """("lost", the error that says so) when an error in the chain says a peer closed its connection, ("maybe", it)
    for a timeout or distributed error, else (None, ``error``)."""
    chain = _chain(error)
    for pattern, verdict in ((_LOST_PEER, "lost"), (_MAYBE_LOST_PEER, "maybe")):
        for item in reversed(chain):   # innermost first: the collective's own error
            if pattern.search(f"{type(item).__name__}: {item}"):
                return verdict, item
    return None, error


def _first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: message``, its first sentence without a C++ source location (gloo's ``[.../pair.cc:537] ...``)."""
    line = _SOURCE_LOCATION.sub("", (str(error).strip().splitlines() or [""])[0])
    line = line.split(". ", 1)[0].rstrip(".") + "." if ". " in line else line
    text = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cause(notes: list[dict], me: Optional[int], started: float, lost: bool) -> Optional[dict]:
    """The note that explains this rank's failure: the first death by a signal of another rank of this run; with a
    lost peer, else the first non-zero exit."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    mine = [n for n in notes if n.get("rank") != me and n.get("time", 0) >= started - 1
            and (not run or not n.get("run") or n["run"] == run)]
    for candidates in ([n for n in mine if n.get("signal")], [n for n in mine if lost and not n.get("signal")]):
        if candidates:
            return min(candidates, key=lambda n: n["time"])
    return None


def explain_failure(error: BaseException, wait_s: float = WAIT_SECONDS) -> Optional[str]:
    """One line naming the peer whose death caused ``error``, with ``error`` as the consequence; None when nothing
    points at a peer. Returns at once unless ``error`` looks like a lost peer or a peer on this node is gone: then it
    waits up to ``wait_s`` seconds for the agent's note (or, without an agent, for a peer on this node to be seen
    dead: a killed process closes its sockets before it turns into a zombie)."""
    verdict, culprit = _lost_peer(error)
    me = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else None
    folder = os.environ.get(NOTES_ENV)
    started = _started_at()
    gone = _dead_local_peer(me)   # seen before the agent's note, whatever the error says
    suspect = verdict is not None or gone is not None
    deadline = time.monotonic() + (wait_s if suspect and (folder or len(_peers) > 1) else 0.0)
    while True:
        note = _cause(read_notes(folder), me, started, suspect)
        gone = gone or _dead_local_peer(me)
        if note is not None or (gone is not None and not folder) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    if note is None and gone is not None and (verdict is not None or gone.get("signal") or gone.get("exit_code")):
        note = gone   # only a lost peer makes a bare "is gone" the cause
    rank = f" (rank {me})" if me is not None else ""
    consequence = f"this rank{rank} only failed as a consequence: {_first_line(culprit)}"
    if note is not None:
        return f"{describe(note)}; {consequence}"
    if verdict == "lost":
        return (f"a peer process closed its connection during a collective: it died or was killed (the torchrun "
                f"summary on its node names the rank and the signal); {consequence}")
    return None


def hold_off_stop_signals() -> dict:
    """Ignore SIGTERM/SIGINT/SIGUSR1 while a failing rank explains itself: torchrun stops the surviving workers
    (SIGTERM) as soon as it sees a dead one, and the survivor must live the moment it takes to find and print the
    cause. Returns the previous handlers for ``signal.signal`` (main thread only)."""
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
