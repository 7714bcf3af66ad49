"""Run a test function on N gloo processes, with the process launch paid once per world size per session.

``run_parallel(fn, *args, world_size=2, tp=2, pp=1)`` returns the list of per-rank return values of
``fn(*args)``, executed after torch.distributed and megatron parallel_state are initialised for that layout.
``fn`` must be a module-level function of an importable module (a test file is fine). Workers stay alive (non-daemonic: dist_checkpointing starts child processes)
between tests (spawning one costs ~8 s of imports on 2 cores); a layout change only rebuilds the megatron
groups. A failure on any rank raises here with every failing rank's traceback; a hang is cut by a timeout
and the pool is rebuilt so later tests still run.
"""
from __future__ import annotations

import atexit
import io
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

TIMEOUT_S = float(os.environ.get("TSDKD_TEST_TIMEOUT", "600"))


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_tsdkd.runtime.distributed import ParallelLayout, init_distributed

    while True:
        message = tasks.get()
        if message is None:
            return
        try:
            fn, args, kwargs, tp, pp, seed = _loads(message)
            init_distributed(ParallelLayout(tensor=tp, pipeline=pp), seed=seed, timeout_minutes=5)
            torch.manual_seed(seed)
            results.put((rank, True, _dumps(fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))


class WorkerPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, kwargs, tp: int, pp: int, seed: int, timeout: float):
        message = _dumps((fn, args, kwargs, tp, pp, seed))
        for q in self.tasks:
            q.put(message)
        values, errors = {}, {}
        while len(values) + len(errors) < self.world_size:
            try:
                rank, ok, payload = self.results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"{fn.__name__} did not finish on all {self.world_size} ranks within {timeout:.0f} s"
                    f" (answered: {sorted(values) + sorted(errors)}; errors so far: {errors})"
                ) from None
            if ok:
                values[rank] = _loads(payload)
            else:
                errors[rank] = payload
                if len(errors) == 1:
                    timeout = min(timeout, 60.0)  # other ranks may be stuck in a collective
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{detail}")
        return [values[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_pools: dict[int, WorkerPool] = {}


def run_parallel(fn, *args, world_size: int, tp: int = 1, pp: int = 1, seed: int = 1234,
                 timeout: float = TIMEOUT_S, **kwargs) -> list:
    """Per-rank results of ``fn(*args, **kwargs)`` on ``world_size`` gloo processes laid out as TP x PP (x DP)."""
    pool = _pools.get(world_size)
    if pool is None:
        pool = _pools[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, args, kwargs, tp, pp, seed, timeout)
    except (TimeoutError, AssertionError):
        # A rank may be wedged in a collective after a failure: start afresh for the next test.
        pool.close()
        _pools.pop(world_size, None)
        raise


def run_serial(fn, *args, seed: int = 1234, **kwargs):
    """``fn`` in a world of one (its own process, so the test process never holds process groups)."""
    return run_parallel(fn, *args, world_size=1, seed=seed, **kwargs)[0]


@atexit.register
def _close_all() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()
