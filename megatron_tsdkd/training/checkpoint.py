"""Resumable, reshardable training checkpoints on megatron-core dist_checkpointing, written atomically.

Layout of ``<checkpoint.dir>``::

    latest                  text file naming the newest COMPLETE checkpoint (replaced atomically)
    step_000120/            one megatron-core distributed checkpoint: student weights (the same keys that
                            tools/convert.py exports), optimizer state, scheduler, step, data position
      hf_meta/              the student's Hugging Face config and tokenizer files, for export
      manifest.json         size of every file, written last: a half-written or truncated checkpoint is refused

A checkpoint is written into ``step_N.partial/`` and renamed only after every rank finished and the manifest is
on disk, so ``latest`` never names a half-written checkpoint. A save must also survive the signals that stop a job
(Slurm signals every process of the step, torchrun every worker's process group): the state is written by this
process and by writer processes it forks with those signals blocked, and by no other helper (see
``_in_process_write_results``). Randomness (on/off-policy draws, sampling seeds) is
derived from (seed, step), so restoring the step restores the random streams exactly.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import time
from typing import Optional

import torch.distributed as dist

from megatron.core import dist_checkpointing

from megatron_tsdkd.models import HF_META_DIR, ModelError, copy_hf_meta
from megatron_tsdkd.models.mcore_checkpoint import LATEST_MARKER, read_latest
from megatron_tsdkd.runtime.atomic_files import write_text_atomic
from megatron_tsdkd.runtime.collectives import barrier
from megatron_tsdkd.training.preemption import job_signals_deferred

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
HOLD_SAVE_ENV = "TSDKD_TEST_HOLD_SAVE"   # tests only: "<step>:<folder>", see _held_for_test


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"



def _write_manifest(folder: str) -> None:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(sizes, indent=1, sort_keys=True))


def verify(folder: str) -> None:
    """Raise CheckpointError unless every file the manifest lists is present with its recorded size."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {MANIFEST}; it was probably interrupted)")
    with open(manifest) as f:
        sizes = json.load(f)
    for rel, size in sizes.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: file {rel} is missing")
        found = os.path.getsize(path)
        if found != size:
            raise CheckpointError(f"{folder}: file {rel} is truncated or altered ({found} bytes, expected {size})")


def latest_checkpoint(root: str) -> Optional[str]:
    try:
        return read_latest(root)
    except ModelError as error:
        raise CheckpointError(str(error)) from None


def save(root: str, step: int, sharded_state: dict, hf_meta_src: Optional[str], keep_last: int,
         files: Optional[dict[str, str]] = None) -> str:
    """Collective: every rank calls it. ``files``: name -> text written beside the state (the resolved config).
    Returns the final folder."""
    rank = dist.get_rank()
    final = os.path.join(root, step_dir_name(step))
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    barrier()
    _in_process_write_results()
    with job_signals_deferred(), _held_for_test(step):
        dist_checkpointing.save(sharded_state, partial)
    barrier()
    if rank == 0:
        if hf_meta_src:
            copy_hf_meta(hf_meta_src, os.path.join(partial, HF_META_DIR))
        for name, text in (files or {}).items():
            write_text_atomic(os.path.join(partial, name), text)
        _write_manifest(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(os.path.join(root, LATEST_MARKER), step_dir_name(step))
        _prune(root, keep_last)
    barrier()
    return final


def _in_process_write_results() -> None:
    """Keep megatron-core's torch_dist writer free of a helper process that a stop signal can kill.

    Its FileSystemWriterAsync collects the write results in a ``multiprocessing.Manager().Queue()`` created at the
    first save: a spawned server process that lives on in this worker's process group. Spawning starts
    multiprocessing's resource tracker, which unblocks SIGINT/SIGTERM in the calling thread, so that server runs
    with SIGTERM at its default action: torchrun's shutdown (``os.killpg(worker, SIGTERM)``) or Slurm's step-wide
    SIGTERM kills it, and the save that the signal asked for then dies in ``dist_checkpointing.save`` with
    BrokenPipeError, leaving ``step_N.partial``. A synchronous save (the only kind this project makes) puts and reads
    that queue in this very process (AsyncRequest.execute_sync), so an in-process queue is all it needs: no server,
    no spawn, nothing for a signal to reach. The writers megatron-core forks per file still exist; they inherit the
    blocked signals of ``job_signals_deferred`` and are waited for by this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()


class _held_for_test:
    """Tests only, free otherwise (one environment lookup per save): with ``TSDKD_TEST_HOLD_SAVE=<step>:<folder>``
    the save of that step is held open inside each forked checkpoint writer, before it writes its file, so that a
    test can signal or kill the job in the middle of a save without racing the clock. Each held writer creates
    ``<folder>/held.<pid>`` and waits (up to 10 minutes) for ``<folder>/release``."""

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


def _prune(root: str, keep_last: int) -> None:
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, step_dir_name(step)), ignore_errors=True)


def load(folder: str, sharded_state: dict) -> dict:
    """Collective. Verifies the manifest first, then loads the requested sharded state (any TP/PP layout)."""
    verify(folder)
    try:
        return dist_checkpointing.load(sharded_state, folder)
    except Exception as error:  # noqa: BLE001 - name the folder whatever the storage layer raised
        raise CheckpointError(f"{folder}: cannot be loaded ({type(error).__name__}: {error})") from error

