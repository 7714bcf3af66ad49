"""A tokenised data set on disk, flat, and the data set every rank memory-maps from it.

Layout of one store folder (memory-mapped, so N ranks on a node share one copy in the page cache instead of holding N
sets of Python lists):

- ``tokens.bin``   raw int32 [T]: every kept example's prompt ids then response ids, one after the other;
- ``index.npy``    int64 [N, 6]: token offset, prompt length, response length, file number, row, has answer;
- ``answers.bin``  raw UTF-8 bytes with ``answer_offsets.npy`` int64 [N + 1]: the reference answers;
- ``meta.json``    the files' display names, the truncation stats, the mode, the sizes and the cache key. Written
  last: a folder without it is not a store (token_cache.py only renames complete folders into place anyway).

The writer streams chunk by chunk straight into the raw files (sizes recorded in ``meta.json``, so they need no
header and no second pass), so a build holds one chunk in memory, not the data set.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from .chat_tokenization import TokenizedExample, TruncationStats
from .chat_dataset import ChatDataset

META = "meta.json"
OFFSET, PROMPT, RESPONSE, FILE, ROW, HAS_ANSWER = range(6)


def _fsync_write(path: str, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


class StoreWriter:
    """Appends chunks of examples to a folder; ``finish`` writes the index and the metadata, fsyncing each file."""

    def __init__(self, folder: str, files: Sequence[str]):
        self.folder = folder
        self.files = list(files)
        self._file_numbers = {name: i for i, name in enumerate(self.files)}
        self._tokens = open(os.path.join(folder, "tokens.bin"), "wb")
        self._answers = open(os.path.join(folder, "answers.bin"), "wb")
        self._index: list[np.ndarray] = []
        self._answer_ends: list[int] = []
        self._token_count = self._answer_bytes = 0

    def add(self, examples: Sequence[TokenizedExample]) -> None:
        rows = np.zeros((len(examples), 6), dtype=np.int64)
        for i, e in enumerate(examples):
            file, row = e.source.rsplit(":", 1)
            ids = np.asarray(e.prompt_ids + e.response_ids, dtype=np.int32)
            self._tokens.write(ids.tobytes())
            rows[i] = (self._token_count, len(e.prompt_ids), len(e.response_ids), self._file_numbers[file], int(row),
                       e.answer is not None)
            self._token_count += len(ids)
            if e.answer is not None:
                data = e.answer.encode("utf-8")
                self._answers.write(data)
                self._answer_bytes += len(data)
            self._answer_ends.append(self._answer_bytes)
        self._index.append(rows)

    def finish(self, stats: TruncationStats, mode: str, key: dict) -> None:
        for handle in (self._tokens, self._answers):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        index = np.concatenate(self._index) if self._index else np.zeros((0, 6), dtype=np.int64)
        _fsync_write(os.path.join(self.folder, "index.npy"), lambda h: np.save(h, index))
        ends = np.asarray([0] + self._answer_ends, dtype=np.int64)
        _fsync_write(os.path.join(self.folder, "answer_offsets.npy"), lambda h: np.save(h, ends))
        meta = {"files": self.files, "stats": dataclasses.asdict(stats), "mode": mode, "examples": len(index),
                "tokens": self._token_count, "answer_bytes": self._answer_bytes, "key": key}
        _fsync_write(os.path.join(self.folder, META), lambda h: h.write(json.dumps(meta, indent=1).encode()))


def _raw(path: str, dtype, count: int) -> np.ndarray:
    """A raw file of ``count`` items, memory-mapped; ValueError when its size says it is not that (truncated)."""
    if os.path.getsize(path) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} does not hold {count} items")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


class _Examples:
    """The store's examples as a read-only sequence (``dataset.examples``), decoded one at a time."""

    def __init__(self, dataset: "MappedChatDataset"):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._dataset[i] for i in range(*index.indices(len(self)))]
        return self._dataset[index]

    def __iter__(self):
        return (self._dataset[i] for i in range(len(self)))


class MappedChatDataset(ChatDataset):
    """A ``ChatDataset`` whose token ids stay in the memory-mapped store; items are built when indexed."""

    def __init__(self, folder: str, meta: dict):
        self.folder = folder
        self.files = meta["files"]
        self.tokens = _raw(os.path.join(folder, "tokens.bin"), np.int32, meta["tokens"])
        self.index = np.load(os.path.join(folder, "index.npy"), mmap_mode="r")
        self.answers = _raw(os.path.join(folder, "answers.bin"), np.uint8, meta["answer_bytes"])
        self.answer_offsets = np.load(os.path.join(folder, "answer_offsets.npy"), mmap_mode="r")
        super().__init__(_Examples(self), TruncationStats(**meta["stats"]), meta["mode"])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> TokenizedExample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range ({len(self)} examples)")
        offset, prompt, response, file, row, has_answer = (int(v) for v in self.index[index])
        ids = self.tokens[offset:offset + prompt + response].tolist()
        answer = None
        if has_answer:
            start, end = int(self.answer_offsets[index]), int(self.answer_offsets[index + 1])
            answer = bytes(self.answers[start:end]).decode("utf-8")
        return TokenizedExample(ids[:prompt], ids[prompt:], answer, f"{self.files[file]}:{row}")

    def lengths(self) -> np.ndarray:
        return np.asarray(self.index[:, PROMPT] + self.index[:, RESPONSE])

    def prompt_lengths(self) -> np.ndarray:
        return np.asarray(self.index[:, PROMPT])

    def response_lengths(self) -> np.ndarray:
        return np.asarray(self.index[:, RESPONSE])


def open_store(folder: str, key: Optional[dict] = None) -> Optional[MappedChatDataset]:
    """The store in ``folder``, or None when it is absent, incomplete, or was built for another ``key``."""
    try:
        with open(os.path.join(folder, META)) as handle:
            meta = json.load(handle)
        if key is not None and meta.get("key") != key:
            return None
        dataset = MappedChatDataset(folder, meta)
    except (OSError, ValueError, KeyError):
        return None
    ends = dataset.index[-1, OFFSET] + dataset.index[-1, PROMPT] + dataset.index[-1, RESPONSE] if len(dataset) else 0
    if len(dataset) != meta["examples"] or len(dataset.tokens) != meta["tokens"] or ends != meta["tokens"]:
        return None
    return dataset


def write_store(folder: str, files: Sequence[str], chunks: Iterable[Sequence[TokenizedExample]],
                stats: TruncationStats, mode: str, key: dict) -> None:
    writer = StoreWriter(folder, files)
    for chunk in chunks:
        writer.add(chunk)
    writer.finish(stats, mode, key)
