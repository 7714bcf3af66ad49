"""Resumable, reshardable training checkpoints on megatron-core dist_checkpointing, written atomically.

Layout of ``<checkpoint.dir>``::

    latest                  text file naming the newest COMPLETE checkpoint (replaced atomically)
    step_000120/            one megatron-core distributed checkpoint: student weights (the same keys that
                            tools/convert.py exports), optimizer state, scheduler, step, data position
      hf_meta/              the student's Hugging Face config and tokenizer files, for export
      manifest.json         size of every file, written last: a half-written or truncated checkpoint is refused

A checkpoint is written into ``step_N.partial/`` and renamed only after every rank finished and the manifest is
on disk, so ``latest`` never names a half-written checkpoint. Randomness (on/off-policy draws, sampling seeds) is
derived from (seed, step), so restoring the step restores the random streams exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch.distributed as dist

from megatron.core import dist_checkpointing

from megatron_tsdkd.models import HF_META_DIR, ModelError, copy_hf_meta
from megatron_tsdkd.models.mcore_checkpoint import LATEST_MARKER, read_latest
from megatron_tsdkd.runtime.collectives import barrier
from megatron_tsdkd.training.preemption import job_signals_deferred

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(folder: str) -> None:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    _atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(sizes, indent=1, sort_keys=True))


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
    with job_signals_deferred():
        dist_checkpointing.save(sharded_state, partial)
    barrier()
    if rank == 0:
        if hf_meta_src:
            copy_hf_meta(hf_meta_src, os.path.join(partial, HF_META_DIR))
        for name, text in (files or {}).items():
            _atomic_write_text(os.path.join(partial, name), text)
        _write_manifest(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write_text(os.path.join(root, LATEST_MARKER), step_dir_name(step))
        _prune(root, keep_last)
    barrier()
    return final


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

