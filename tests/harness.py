"""Run a test function on N gloo processes, with the process launch paid once per world size per session.

``run_parallel(fn, *args, world_size=2, tp=2, pp=1)`` returns the list of per-rank return values of
``fn(*args)``, executed after torch.distributed and megatron parallel_state are initialised for that layout.
``fn`` must be a module-level function of an importable module (a test file is fine). Workers stay alive
(non-daemonic: dist_checkpointing starts child processes) between tests (spawning one costs ~8 s of imports on
2 cores); a layout change rebuilds the megatron groups, destroying the old ones (runtime.distributed does that),
and an unchanged layout keeps them. A failure on any rank raises here with every failing rank's traceback; a hang
is cut by a timeout, a dead worker is noticed within a second, and the pool is rebuilt so later tests still run.

Nothing outlives the session: ``close()`` asks the workers to stop (each one ends its own child processes first),
waits, then kills what is left of each worker's process tree; pools are closed at exit, and a worker whose
parent has died (pytest killed) cleans up and exits by itself. Each answer carries the worker's OS thread count;
the peak per pool size is printed at exit (``PEAK_THREADS``), so a leak shows in any run.
"""
from __future__ import annotations

import atexit
import io
import os
import queue
import signal
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

TIMEOUT_S = float(os.environ.get("TSDKD_TEST_TIMEOUT", "600"))
POLL_S = 1.0                 # how often a waiting side checks that the other side still exists
CLOSE_GRACE_S = 10.0         # how long close() waits for a worker to stop by itself before killing it


# world size -> the most OS threads any of its workers held after a task (printed at exit; gloo's are not Python's)
PEAK_THREADS: dict[int, int] = {}


def os_threads() -> int:
    """This process's OS threads (threading.active_count() misses gloo's and torch's)."""
    return len(os.listdir("/proc/self/task"))


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# Process trees from /proc (psutil may not be installed).

def _proc_stat(pid: int):
    """(parent pid, state, start time) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of ``pid`` as (pid, start time), children before grandchildren."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[1] != "Z":
                children.setdefault(stat[0], []).append((int(name), stat[2]))
    found, frontier = [], [pid]
    while frontier:
        kids = [kid for parent in frontier for kid in children.get(parent, [])]
        found.extend(kids)
        frontier = [kid for kid, _ in kids]
    return found


def alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` still runs (a zombie does not; with ``start_time``, only that very process counts)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] != "Z" and (start_time is None or stat[2] == start_time)


def _signal(procs: list[tuple[int, int]], sig: int) -> None:
    for pid, start in procs:
        if alive(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _wait_gone(procs: list[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        left = [(pid, start) for pid, start in procs if alive(pid, start)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def end_processes(procs: list[tuple[int, int]], grace: float = 3.0) -> list[tuple[int, int]]:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL; returns those still alive after that (should be none)."""
    _signal(procs, signal.SIGTERM)
    left = _wait_gone(procs, grace)
    _signal(left, signal.SIGKILL)
    return _wait_gone(left, 5.0)


def _end_own_children() -> None:
    """In a worker about to exit: stop every process it started (dist_checkpointing helpers, anything else) and
    what those started in turn (listed first: once their parent is gone they are no longer found below us).

    multiprocessing's resource tracker is left to exit on its own: it ignores SIGTERM and ends as soon as the
    processes sharing its pipe are gone, after unlinking what they leaked."""
    import multiprocessing

    tree = []
    for pid, start in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.resource_tracker" in f.read():
                    continue
        except OSError:
            continue
        tree.append((pid, start))
    for child in multiprocessing.active_children():   # politely first: lets them run their exit handlers
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=3)
    end_processes(tree)


# ---------------------------------------------------------------------------------------------------------------

class _Terminated(BaseException):
    """SIGTERM in a worker (a task's own SystemExit is reported like any error; this one ends the worker)."""


_worker_pid = None


def _terminate(*_) -> None:
    if os.getpid() != _worker_pid:   # a child forked by the task inherited the handler: die as it would have
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise _Terminated()


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    # every rank connects to the pool's store (WorkerPool: bound by the test process) as torchrun's workers do to
    # their agent's; dropped once the default group exists, so that processes a task starts do not inherit it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    parent = os.getppid()
    # A plain SIGTERM (close() after its grace, a CI runner ending pytest's process group) unwinds through the
    # finally below, so the worker's children go with it.
    global _worker_pid
    _worker_pid = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from megatron_tsdkd.runtime.distributed import ParallelLayout, init_distributed

        while True:
            try:
                message = tasks.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent:   # the test process died without closing the pool
                    return
                continue
            if message is None:
                return
            try:
                fn, args, kwargs, (tp, pp, ep), seed = _loads(message)
                init_distributed(ParallelLayout(tensor=tp, pipeline=pp, expert=ep), seed=seed, timeout_minutes=5)
                os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
                torch.manual_seed(seed)
                value = _dumps(fn(*args, **kwargs))
                _forget_models()
                results.put((rank, True, value, os_threads()))
            except _Terminated:
                raise
            except BaseException:  # noqa: BLE001 - report everything to the parent, SystemExit included
                error = traceback.format_exc()
                _forget_models()
                results.put((rank, False, error, os_threads()))
    except _Terminated:
        sys.exit(128 + signal.SIGTERM)
    finally:
        _end_own_children()


def _forget_models() -> None:
    """Let the models a task built die with it. megatron-core memoises ``RotaryEmbedding.forward`` in a class-wide
    ``lru_cache`` (32 entries, keyed by the module itself), so a finished task's rotary modules stay alive; with
    ``optimizer.overlap_param_gather`` each holds the DDP forward pre-hook, hence the whole model, its optimizer and
    the process groups of a layout the next task destroys: each gloo group's threads would live on in this worker
    (+16 groups, 48 threads, per layout change). A training process builds its models once, so only this
    long-lived worker needs it."""
    import gc

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.forward.cache_clear()
    gc.collect()


class WorkerPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.closed = False
        ctx = mp.get_context("spawn")
        # The workers' rendezvous store, on a port the kernel picks as it binds, held for the pool's life: a port
        # found free and bound later by rank 0 could be taken in between by a process of the other lane of
        # `make test` (EADDRINUSE, seen in a full run).
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        port = self.store.port
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, kwargs, layout: tuple[int, int, int], seed: int, timeout: float):
        message = _dumps((fn, args, kwargs, layout, seed))
        for q in self.tasks:
            q.put(message)
        values, errors = {}, {}
        started = time.monotonic()
        deadline = started + timeout
        while len(values) + len(errors) < self.world_size:
            try:
                rank, ok, payload, threads = self.results.get(
                    timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(self.procs)
                        if not p.is_alive() and r not in values and r not in errors}
                if dead:
                    raise AssertionError(f"{fn.__name__}: worker rank(s) died (exit codes {dead});"
                                         f" answered: {sorted(values) + sorted(errors)}; errors: {errors}") from None
                if time.monotonic() < deadline:
                    continue
                waited = time.monotonic() - started
                raise TimeoutError(
                    f"{fn.__name__} did not finish on all {self.world_size} ranks within {waited:.0f} s"
                    f"{' (60 s after the first error)' if errors else ''}"
                    f" (answered: {sorted(values) + sorted(errors)}; errors so far: {errors})"
                ) from None
            PEAK_THREADS[self.world_size] = max(PEAK_THREADS.get(self.world_size, 0), threads)
            if ok:
                values[rank] = _loads(payload)
            else:
                errors[rank] = payload
                if len(errors) == 1:   # other ranks may be stuck in a collective
                    deadline = min(deadline, time.monotonic() + 60.0)
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{detail}")
        return [values[r] for r in range(self.world_size)]

    def pids(self) -> list[tuple[int, int]]:
        """The workers and every process below them, as (pid, start time)."""
        found = []
        for p in self.procs:
            stat = _proc_stat(p.pid) if p.pid else None
            if stat is not None:
                found.append((p.pid, stat[2]))
                found.extend(descendants(p.pid))
        return found

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Stop the workers and everything they started; idempotent. A worker that does not stop within ``grace``
        seconds (stuck in a task or a collective) is killed along with its process tree."""
        if self.closed:
            return
        self.closed = True
        tree = self.pids()   # before any worker exits: its orphans would no longer be found below it
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [p for p in self.procs if p.is_alive()]
        orphans = list(dict.fromkeys(kid for p in stuck for kid in descendants(p.pid)))
        for p in stuck:
            p.kill()
        left = end_processes(orphans, grace=2.0)   # a killed worker could not end its own children
        for p in stuck:   # only now: forked children hold the pipe that join() waits on
            p.join(timeout=5)
        # A worker that stopped by itself has ended its children; anything else it left gets a moment, then a kill.
        left += end_processes(_wait_gone(list(dict.fromkeys(tree)), 3.0), grace=2.0)
        for q in [*self.tasks, self.results]:
            q.close()
            q.cancel_join_thread()
        self.store = None   # its server thread ends with it
        if left:
            raise RuntimeError(f"processes of the worker pool survived SIGKILL: {left}")


_pools: dict[int, WorkerPool] = {}


def run_parallel(fn, *args, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234,
                 timeout: float = TIMEOUT_S, **kwargs) -> list:
    """Per-rank results of ``fn(*args, **kwargs)`` on ``world_size`` gloo processes laid out as TP x PP (x DP;
    a MoE model's experts over ``ep`` of the data-parallel ranks)."""
    pool = _pools.get(world_size)
    if pool is None:
        pool = _pools[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, args, kwargs, (tp, pp, ep), seed, timeout)
    except (TimeoutError, AssertionError):
        # A rank may be wedged in a collective after a failure: start afresh for the next test.
        _pools.pop(world_size, None)
        try:
            pool.close()
        except RuntimeError as exc:   # the test's own error is the one to see
            print(f"harness: {exc}", file=sys.__stderr__, flush=True)
        raise


def run_serial(fn, *args, seed: int = 1234, **kwargs):
    """``fn`` in a world of one (its own process, so the test process never holds process groups)."""
    return run_parallel(fn, *args, world_size=1, seed=seed, **kwargs)[0]


@atexit.register
def _close_all() -> None:
    if PEAK_THREADS:
        peaks = ", ".join(f"{world}-process pool {n}" for world, n in sorted(PEAK_THREADS.items()))
        print(f"harness: peak OS threads per worker: {peaks}", file=sys.__stderr__, flush=True)
    while _pools:
        _, pool = _pools.popitem()
        try:
            pool.close()
        except Exception as exc:  # noqa: BLE001 - close the others anyway
            print(f"harness: closing the {pool.world_size}-process pool: {exc}", file=sys.__stderr__, flush=True)
