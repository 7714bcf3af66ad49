"""Time per phase inside the training step (teacher forward, student forward) without host syncs in the step.

On GPU each phase is bracketed by two CUDA events recorded on the current stream, so it measures the device work
the phase issued, however asynchronously. Nothing waits for them inside the step: ``pop()`` hands the events over
in a ``PhaseTimes`` mapping that waits for and reads them when it is first looked at, one synchronisation, and
only on steps whose times are used (the trainer reads them on logged steps; a mapping never read never waits).
On CPU the wall clock is read around each phase: the work is synchronous there, and the CPU shim's stand-in for
``torch.cuda.Event`` measures nothing.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import torch

from megatron_tsdkd.runtime import cpu_shim


def _cuda_events() -> bool:
    return torch.cuda.is_available() and not cpu_shim.is_applied()


class PhaseTimes(Mapping):
    """``{phase: seconds}``; CUDA events still pending are waited for and read at the first access."""

    def __init__(self, seconds: dict[str, float], pending: list):
        self._seconds, self._pending = dict(seconds), pending

    def _resolved(self) -> dict[str, float]:
        if self._pending:
            for _, _, end in self._pending:   # one wait: the events of one stream complete in order
                end.synchronize()
            for name, start, end in self._pending:
                self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0  # ms
            self._pending = []
        return self._seconds

    def __getitem__(self, phase: str) -> float:
        return self._resolved()[phase]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        return f"PhaseTimes({self._resolved()!r})"


class PhaseClock:
    """Accumulates seconds per phase; ``pop()`` returns ``{phase: seconds}`` since the last pop and starts afresh."""

    def __init__(self):
        self._seconds: dict[str, float] = {}
        self._pending: list[tuple[str, object, object]] = []   # (phase, start event, end event)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as phase ``name`` (added to earlier blocks of the same name)."""
        if _cuda_events():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            begin = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - begin)

    def add(self, phase: str, seconds: float) -> None:
        self._seconds[phase] = self._seconds.get(phase, 0.0) + seconds

    def pop(self) -> PhaseTimes:
        out = PhaseTimes(self._seconds, self._pending)
        self._seconds, self._pending = {}, []
        return out
