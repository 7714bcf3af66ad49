"""Resumable, reshardable training checkpoints on megatron-core dist_checkpointing: atomic, asynchronous, fully
parallel.

Layout of ``<checkpoint.dir>``::

    latest                  text file naming the newest COMPLETE checkpoint (replaced atomically)
    step_000120/            one megatron-core distributed checkpoint: student weights (the same keys that
                            tools/convert.py exports), optimizer state, scheduler, step, data position
      hf_meta/              the student's Hugging Face config and tokenizer files, for export
      manifest.json         size of every file, written last: a half-written or truncated checkpoint is refused

Writing (``CheckpointWriter``). A checkpoint is written into ``step_N.partial/``. With ``checkpoint.async_save``
(the default) the save blocks training only while megatron-core plans it and copies this rank's shards to host
memory; a process forked at that moment (megatron-core's ``AsyncCallsQueue``) writes the files while training goes
on. Once every rank's write has ended, the finalisation (collective, in the trainer) writes megatron's metadata,
then rank 0 the manifest, renames the folder to ``step_N``, moves ``latest`` and prunes: ``latest`` never names a
half-written checkpoint, and a job killed during a write (even ``kill -9``) resumes from the one before. The
training loop finalises a finished write after every step (one integer all-reduce while a write is in flight, none
otherwise); a new save, the save a signal asks for and the end of the job wait for the write in flight. Saves and
loads are fully parallel over the data-parallel group (megatron-core's FullyParallel{Save,Load}StrategyWrapper):
shards that data-parallel ranks hold alike are written by one of them, spread evenly, and read once then exchanged.

Signals. A save must survive the signals that stop a job (Slurm signals every process of the step, torchrun
every worker's process group): the state is written by this process and by writer processes it forks with those
signals blocked (``job_signals_deferred``), and by no other helper (see ``_WriteResults``). An asynchronous write's
process dies with its trainer (``end_with_parent``): a killed job leaves nothing writing on (the file writers that
process forked finish the file in hand, inside ``step_N.partial``). Randomness
(on/off-policy draws, sampling seeds) is derived from (seed, step), so restoring the step restores the random
streams exactly.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import queue
import re
import shutil
import time
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from megatron_tsdkd.models import HF_META_DIR, ModelError, copy_hf_meta
from megatron_tsdkd.models.run_folder import (CheckpointError, latest_checkpoint, prune, step_dir_name, verify,
                                               write_latest, write_manifest)
from megatron_tsdkd.runtime.atomic_files import write_atomic, write_text_atomic
from megatron_tsdkd.runtime.collectives import barrier
from megatron_tsdkd.runtime.parent_watch import end_with_parent
from megatron_tsdkd.engines.preemption import job_signals_deferred

HOLD_SAVE_ENV = "TSDKD_TEST_HOLD_SAVE"   # tests only: "<step>:<folder>", see _held_for_test


class CheckpointWriter:
    """A run's checkpoint writes into ``root``: at most one in flight, finalised in order (see the module
    docstring). Every method is a collective that all ranks call alike. ``group``: the data-parallel group over
    which saves and loads are spread (None: the world)."""

    def __init__(self, root: str, keep_last: int, async_save: bool, group=None):
        self.root, self.keep_last, self.async_save, self.group = root, keep_last, async_save, group
        self.strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
        self.in_flight = AsyncCallsQueue()   # forks one writer process per save (megatron's TemporalAsyncCaller)

    def save(self, step: int, sharded_state: dict, hf_meta_src: Optional[str] = None,
             files: Optional[dict[str, str]] = None) -> str:
        """Start writing checkpoint ``step`` (and, when not async, finish it). ``files``: name -> text written
        beside the state (the resolved config). Returns the folder the checkpoint will have once finalised."""
        self.finalize(blocking=True)
        final = os.path.join(self.root, step_dir_name(step))
        partial = final + ".partial"
        if dist.get_rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(partial):
                shutil.rmtree(partial)
            os.makedirs(partial)
        barrier()
        _WRITE_RESULTS.install(partial)
        with job_signals_deferred(), _held_for_test(step):
            request = dist_checkpointing.save(sharded_state, partial, self.strategy, async_sharded_save=True)
            request.add_finalize_fn(functools.partial(self.publish, partial, final, hf_meta_src, dict(files or {})))
            if self.async_save:
                self.in_flight.schedule_async_request(_ending_with_trainer(request))
            else:
                request.execute_sync()
        return final

    def finalize(self, blocking: bool) -> None:
        """Finalise the write in flight if it has ended on every rank (``blocking``: wait for it). Free when
        nothing is in flight."""
        if self.in_flight.get_num_unfinalized_calls():
            self.in_flight.maybe_finalize_async_calls(blocking=blocking)

    def load(self, folder: str, sharded_state: dict) -> dict:
        return load(folder, sharded_state, self.group)

    def publish(self, partial: str, final: str, hf_meta_src: Optional[str], files: dict[str, str]) -> None:
        """The last finalisation step, after megatron-core's metadata: every rank's files are on disk."""
        _WRITE_RESULTS.install(None)
        if dist.get_rank() == 0:
            if hf_meta_src:
                copy_hf_meta(hf_meta_src, os.path.join(partial, HF_META_DIR))
            for name, text in files.items():
                write_text_atomic(os.path.join(partial, name), text)
            write_manifest(partial)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            write_latest(self.root, os.path.basename(final))
            prune(self.root, self.keep_last)
        barrier()


def _ending_with_trainer(request: AsyncRequest) -> AsyncRequest:
    """The request, its write made to die with the trainer that forks it: a trainer killed mid-write (kill -9,
    the OOM killer, a dead torchrun) must not leave a process writing into a folder the next run will reuse."""
    if request.async_fn is None:   # nothing to write on this rank
        return request
    return request._replace(async_fn=functools.partial(_write_in_child, request.async_fn))


def _write_in_child(write, *args, **kwargs) -> None:
    end_with_parent(only_under_agent=False)
    write(*args, **kwargs)


class _WriteResults:
    """Stands in for megatron-core's write-results queue (``filesystem_async._results_queue``): the writer puts
    each save's results there, the finalisation takes them.

    megatron-core's own is a ``multiprocessing.Manager().Queue()``: a spawned server process that lives on in this
    worker's process group. Spawning starts multiprocessing's resource tracker, which unblocks SIGINT/SIGTERM in
    the calling thread, so that server runs with SIGTERM at its default action: torchrun's shutdown
    (``os.killpg(worker, SIGTERM)``) or Slurm's step-wide SIGTERM kills it, and the save that the signal asked for
    dies with BrokenPipeError, leaving ``step_N.partial``. A pipe-backed queue would not do either: the forked
    writer could not end before the trainer read a result larger than the pipe's buffer, and the trainer reads
    only after it ended. So the result goes into a file of the checkpoint being written
    (``.write_results.<rank>``, taken before the manifest): no helper process, nothing for a signal to reach,
    and the same path for synchronous and asynchronous saves. Outside our saves (models.save_mcore_weights in the
    same process) it is an in-process queue, which a synchronous save is all it needs."""

    def __init__(self):
        self.path: Optional[str] = None
        self.local: queue.Queue = queue.Queue()

    def install(self, folder: Optional[str]) -> None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._results_queue = self
        self.path = os.path.join(folder, f".write_results.{dist.get_rank()}") if folder else None

    def put(self, item) -> None:   # in the writer (a forked process when asynchronous)
        if self.path is None:
            self.local.put(item)
            return

        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(item, f)
        write_atomic(self.path, write)

    def get_nowait(self):          # in the trainer, once the writer ended
        if self.path is None:
            return self.local.get_nowait()
        if not os.path.isfile(self.path):
            raise queue.Empty
        with open(self.path, "rb") as f:
            item = pickle.load(f)
        os.remove(self.path)
        return item


_WRITE_RESULTS = _WriteResults()


class _held_for_test:
    """Tests only, free otherwise (one environment lookup per save): with ``TSDKD_TEST_HOLD_SAVE=<step>:<folder>``
    the save of that step is held open inside each forked checkpoint writer, before it writes its file, so that a
    test can signal or kill the job in the middle of a save without racing the clock. Each held writer creates
    ``<folder>/held.<pid>`` and waits (up to 10 minutes, or until its parent dies) for ``<folder>/release``."""

    def __init__(self, step: int):
        spec = os.environ.get(HOLD_SAVE_ENV, "")
        held_step, _, self.folder = spec.partition(":")
        self.active = bool(self.folder) and held_step == str(step)

    def __enter__(self):
        if self.active:
            from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

            self.original = FileSystemWriterAsync.__dict__["write_preloaded_data"]
            write, folder = self.original.__func__, self.folder

            def held_write(*args, **kwargs):   # runs in the forked writer
                end_with_parent(only_under_agent=False)
                with open(os.path.join(folder, f"held.{os.getpid()}"), "w"):
                    pass
                deadline = time.monotonic() + 600
                while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
                    time.sleep(0.05)
                return write(*args, **kwargs)

            FileSystemWriterAsync.write_preloaded_data = staticmethod(held_write)
        return self

    def __exit__(self, *exc):
        if self.active:
            from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

            FileSystemWriterAsync.write_preloaded_data = self.original
        return False


def load(folder: str, sharded_state: dict, group=None) -> dict:
    """Collective. Verifies the manifest first, then loads the requested sharded state (any TP/PP layout), each
    shard read by one rank of ``group`` (the data-parallel group; None: the world) and exchanged."""
    verify(folder)
    try:
        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(folder), group)
        return dist_checkpointing.load(sharded_state, folder, strategy)
    except Exception as error:  # noqa: BLE001 - name the folder whatever the storage layer raised
        raise CheckpointError(f"{folder}: cannot be loaded ({type(error).__name__}: {error})") from error
