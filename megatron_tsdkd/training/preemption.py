"""SIGTERM / SIGUSR1 (Slurm preemption or time limit) make the job save a checkpoint and exit cleanly.

The handler only records the signal; the training loop checks after each optimizer step, and all ranks agree via
an all-reduce (a signal may reach only some ranks, or reach them at different steps).
"""
from __future__ import annotations

import contextlib
import signal

from megatron_tsdkd.runtime.collectives import any_true


JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def job_signals_deferred():
    """Hold SIGTERM/SIGUSR1 until the block ends (they are delivered then, not lost).

    Slurm signals EVERY process of a job step. dist_checkpointing spawns a helper process at the first save, and a
    helper killed by a step-wide USR1 breaks every later save. Processes spawned inside this block inherit the
    blocked mask, so they never die of those signals; the trainer itself still receives them right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionFlag:
    def __init__(self, signals=JOB_SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank_received(self) -> bool:
        """Collective over the world: True if any rank got a signal."""
        return any_true(self.received is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
