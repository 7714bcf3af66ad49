"""Files that appear complete or not at all: write a temporary file beside the target, flush it to disk, rename.
A reader (a resumed job, a rerun preparation, a study deciding whether a cell is finished) that sees the file can
trust it. The one writer every checkpoint marker, prepared artefact, exported weight file and result file goes
through.

Every file it writes gets the mode a plain ``open()`` would give it under the process's umask (0644 under umask
022, 0640 under 027), whatever created the temporary file: safetensors (and libraries built on it, such as
transformers' ``save_pretrained``) write through a private 0600 temporary file of their own, which would leave
exported weights unreadable to the rest of a team on a shared cluster.
"""
from __future__ import annotations

import json
import os
from typing import Callable


def umask() -> int:
    """The process's file-creation mask. Read from /proc (Linux) so that no other thread ever sees a changed mask;
    elsewhere set-and-restored, the only portable way to read it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def honour_umask(folder: str) -> None:
    """Give every regular file under ``folder`` the mode ``open()`` would have given it (see the module docstring).
    For folders a library wrote file by file (transformers' ``save_pretrained``); our own writes go through
    ``write_atomic`` and need no repair."""
    mode = file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` writes the content; the file then gets the umask's mode, is synced and renamed to
    ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(path: str, obj, **dump_options) -> None:
    write_text_atomic(path, json.dumps(obj, **dump_options))
