"""A training run's checkpoint folder, as both engines write it and every reader of a model path resolves it::

    latest          text file naming the newest COMPLETE checkpoint (replaced atomically, after every rank wrote)
    step_000120/    one checkpoint (megatron-core's distributed checkpoint, or DeepSpeed's), manifest.json last

The names, the manifest (every file's size, written last: a half-written or truncated checkpoint is refused), the
``latest`` marker (one writer, one reader) and pruning live here, once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from megatron_tsdkd.models.errors import ModelError
from megatron_tsdkd.runtime.atomic_files import write_text_atomic

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
LATEST_MARKER = "latest"   # in a run's checkpoint folder: the name of its newest COMPLETE checkpoint (both engines)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(folder: Optional[str]) -> int:
    """The step a checkpoint folder holds, from its name (0 for none, or a folder not named step_NNNNNN)."""
    match = STEP_DIR.match(os.path.basename(os.path.normpath(folder))) if folder else None
    return int(match.group(1)) if match else 0


def write_manifest(folder: str) -> None:
    """The manifest of a finished checkpoint: every file below ``folder`` with its size (written last)."""
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
    """The newest complete checkpoint of a run's checkpoint folder (its ``latest``), None before the first; a marker
    naming a missing folder is a CheckpointError."""
    try:
        return read_latest(root)
    except ModelError as error:
        raise CheckpointError(str(error)) from None


def write_latest(root: str, name: str) -> None:
    """Point a run's ``latest`` marker at its checkpoint ``name`` (the one writer of that marker; atomic). Call it
    only once every rank's part of that checkpoint is on disk."""
    write_text_atomic(os.path.join(root, LATEST_MARKER), name)


def read_latest(root: str) -> Optional[str]:
    """The checkpoint folder a training run's ``latest`` marker names (the one reader of that marker), or None
    when ``root`` has no marker. ModelError when it names a folder that does not exist."""
    marker = os.path.join(root, LATEST_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    folder = os.path.join(root, name)
    if not name or not os.path.isdir(folder):
        raise ModelError(f"{marker} names {name!r}, which does not exist")
    return folder


def prune(root: str, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (0: keep all)."""
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, step_dir_name(step)), ignore_errors=True)
