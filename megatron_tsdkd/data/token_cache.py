"""Tokenise once: the tokenised set lives on disk under a key of everything that decides its tokens, built by one
process while the others wait, then memory-mapped by every rank (data/token_store.py).

The key: the data files' fingerprints (path, size, mtime, a hash of each file's ends; data/sources.py), the
tokenizer (its serialised vocabulary, merges and special tokens), the chat template and end-of-turn token, the length
limits, the column mapping and the mode. Its hash names the folder ``<cache_dir>/<data name>-<mode>-<hash>``, so a
changed input, tokenizer or template finds no folder and builds a new one (old folders stay until removed by hand).

Once, without process groups (check_inputs runs before any exist): every process takes an exclusive file lock
next to the folder (runtime/file_lock.py: ``flock``, released by the kernel when its holder dies, kill -9 included;
where the file system refuses ``flock``, as Lustre without ``-o flock`` does, an exclusive-create lock file whose
dead holder is detected by pid or missing heartbeat). The first builds, the others wait on the lock, polling with
backoff, up to ``wait_seconds``; each one that gets the lock looks again and finds the finished folder. The
builder writes into a fresh ``<folder>.building-*`` folder, fsyncs every file, writes ``meta.json`` (with the key)
last, and renames the folder into place (atomic on one file system); a folder is used only when its ``meta.json``
holds the same key and its arrays have the recorded sizes. Leftovers of a killed builder are removed by the next
builder (it holds the lock, so nobody is writing them).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Optional

from megatron_tsdkd.runtime.file_lock import FileLock, describe

from .chat_tokenization import ChatTemplateTokenizer, TruncationStats
from .chat_dataset import tokenized_chunks
from .records import Fields, Mode
from .sources import DataSource, fingerprint, row_count
from .token_store import MappedChatDataset, open_store, write_store

VERSION = 1                      # of the store layout and of this key; bump when either changes
WAIT_SECONDS = 24 * 3600.0       # how long a rank waits for the builder before it gives up with an error
log = logging.getLogger("megatron_tsdkd.data")


def resolve_cache_dir(setting: str, logging_dir: str) -> Optional[str]:
    """``data.cache_dir``: ``auto`` = a ``data_cache`` folder beside ``logging.dir`` (with the defaults
    ``outputs/data_cache``, beside the checkpoints and TensorBoard logs); ``none`` or ``""`` = no cache (None)."""
    if setting in ("", "none"):
        return None
    if setting == "auto":
        return os.path.join(os.path.dirname(os.path.normpath(logging_dir)) or ".", "data_cache")
    return setting


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its serialised backend (fast tokenizers), else its vocabulary,
    plus its class and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()


def cache_key(source: DataSource, chat: ChatTemplateTokenizer, mode: Mode, max_length: int, max_prompt_length: int,
              fields: Fields) -> dict:
    return {"version": VERSION, "kind": source.kind, "files": fingerprint(source),
            "tokenizer": tokenizer_fingerprint(chat.tokenizer), "chat_template": chat.tokenizer.chat_template,
            "end_of_turn": chat.end_of_turn_token, "max_length": max_length, "max_prompt_length": max_prompt_length,
            "fields": [fields.prompt, fields.response, fields.answer, fields.messages], "mode": mode}


def cache_folder(cache_dir: str, source: DataSource, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = os.path.basename(os.path.normpath(source.path)).replace(".", "_") or "data"
    return os.path.join(cache_dir, f"{name}-{key['mode']}-{digest}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(folder: str, source: DataSource, chat: ChatTemplateTokenizer, mode: Mode, max_length: int,
           max_prompt_length: int, fields: Fields, key: dict, on_progress: Optional[Callable[[int], None]]) -> None:
    from tqdm import tqdm

    for leftover in glob.glob(glob.escape(folder) + ".building-*"):   # a killed builder's; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    if os.path.exists(folder):        # incomplete or unreadable: never used, replaced
        shutil.rmtree(folder)
    parent = os.path.dirname(folder)
    temp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".building-", dir=parent)
    stats = TruncationStats()
    try:
        with tqdm(total=row_count(source), unit=" rows", desc=f"tokenising {source.path}", mininterval=1.0) as bar:
            def progress(rows: int) -> None:
                bar.update(rows)
                if on_progress is not None:
                    on_progress(stats.read)

            chunks = tokenized_chunks(source, chat, mode, max_length, max_prompt_length, fields, stats, progress)
            write_store(temp, source.files, chunks, stats, mode, key)
        _fsync_dir(temp)
        os.rename(temp, folder)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def cached_dataset(source: DataSource, chat: ChatTemplateTokenizer, mode: Mode, max_length: int,
                   max_prompt_length: int, fields: Fields, cache_dir: str,
                   on_progress: Optional[Callable[[int], None]] = None,
                   wait_seconds: float = WAIT_SECONDS) -> MappedChatDataset:
    """The memory-mapped tokenised set of ``source``, built here unless a complete one with the same key exists;
    ``on_progress(rows read)`` after each chunk of a build."""
    key = cache_key(source, chat, mode, max_length, max_prompt_length, fields)
    folder = cache_folder(cache_dir, source, key)
    dataset = open_store(folder, key)
    if dataset is not None:
        return dataset
    os.makedirs(cache_dir, exist_ok=True)
    lock = FileLock(folder + ".lock")
    if not lock.acquire(timeout=0):
        holder = lock.read_holder()        # recorded by an exclusive-create lock only (where flock is refused)
        log.info("waiting for another process%s to tokenise %s into %s", f" ({describe(holder)})" if holder else "",
                 source.path, folder)
        if not lock.acquire(timeout=wait_seconds):
            held = lock.held_path if lock.mode == "exclusive-create" else lock.path
            raise ValueError(f"waited {wait_seconds:.0f} s for another process to tokenise it into {folder} "
                             f"(lock {held}); is that process stuck?")
    try:
        dataset = open_store(folder, key)
        if dataset is None:
            _build(folder, source, chat, mode, max_length, max_prompt_length, fields, key, on_progress)
            dataset = open_store(folder, key)
        if dataset is None:
            raise ValueError(f"{folder}: the tokenised set just built cannot be read back")
        return dataset
    finally:
        lock.release()
