"""Files that appear complete or not at all: write a temporary file beside the target, flush it to disk, rename.
A reader (a resumed job, a rerun preparation, a study deciding whether a cell is finished) that sees the file can
trust it. The one writer every checkpoint marker, prepared artefact and result file goes through."""
from __future__ import annotations

import json
import os
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` writes the content; the file is then synced and renamed to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
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
