"""SIGTERM / SIGINT / SIGUSR1 (Slurm preemption or time limit, scancel, Ctrl-C, torchrun passing one on) make the job
save a checkpoint and exit cleanly (exit 0).

The handler only records the signal; the training loop checks after each optimizer step (and after each periodic
save), and all ranks agree via an all-reduce (a signal may reach only some ranks, or reach them at different steps).
SIGINT is one of them because torchrun turns Ctrl-C into SIGINT to every worker (``os.killpg``): without a handler it
would be a KeyboardInterrupt in the middle of a step or a save.

Creating the flag also arms ``runtime.parent_watch`` in a torchrun worker: if torchrun dies without passing a signal
on (``kill -9``), the worker is killed at once instead of training on unsupervised.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Optional

from megatron_tsdkd.runtime.collectives import any_true
from megatron_tsdkd.runtime.parent_watch import end_with_parent


JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def job_signals_deferred():
    """Hold SIGTERM/SIGINT/SIGUSR1 until the block ends (they are delivered then, not lost).

    Slurm signals EVERY process of a job step, and torchrun signals each worker's whole process group: the
    checkpoint writer processes that dist_checkpointing forks during a save get the signal too. Processes forked
    inside this block inherit the blocked mask, so they never see it, and neither do the processes they fork (an
    asynchronous save's writing process outlives the block and forks its file writers later); the trainer receives
    it right after the block.
    (A ``spawn``-ed helper would NOT be protected: multiprocessing's resource tracker, started by the first spawn,
    unblocks SIGINT/SIGTERM in the calling thread. engines/checkpoint.py therefore keeps every save free of
    spawned helpers.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionFlag:
    def __init__(self, signals=JOB_SIGNALS):
        self.received: Optional[int] = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        end_with_parent()   # a no-op outside torchrun workers

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def any_rank_received(self) -> bool:
        """Collective over the world: True if any rank got a signal."""
        return any_true(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
