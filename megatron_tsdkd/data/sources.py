"""Where training rows come from: the file formats users have, read as plain dicts with a ``file:row`` address.

- JSONL, plain or ``.gz`` (``.jsonl``, ``.json``, ``.ndjson``): read line by line here, not through ``datasets``,
  because its JSON loader infers one Arrow type per column and a single odd line fails the whole file without saying
  which line; ours stops at that line (records.py). Rows are numbered by line.
- parquet: one file, or a folder of shards (every ``*.parquet`` below it, in sorted path order, as the Hub's
  ``data/train-0000x-of-0000n.parquet`` layout lists them); streamed shard by shard through ``datasets``, so nothing is
  copied into its cache. Rows are numbered from 1 within each shard.
- Arrow: one ``.arrow`` file (``datasets``' own files), memory-mapped by ``datasets``.
- a ``Dataset.save_to_disk`` folder (``state.json``), memory-mapped by ``datasets.load_from_disk``; a DatasetDict folder
  names its splits, point at one. Rows are numbered from 1 over the folder.
Local files only: ``HF_DATASETS_OFFLINE`` is set before ``datasets`` is imported, so nothing reaches the Hub.
``fingerprint`` says when a file changed (path, size, mtime and a hash of its first and last 64 KiB) without reading it
whole, and without importing ``datasets``: a cached start reads no data file.
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from .records import DataFormatError, json_lines

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
FORMATS = "JSONL (.jsonl or .jsonl.gz), parquet (a file or a folder of shards), .arrow, or a save_to_disk folder"
BATCH_ROWS = 1000


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()   # our own bar counts rows over all shards
    return datasets


@dataclass(frozen=True)
class DataSource:
    path: str                 # as the user gave it
    kind: str                 # jsonl | parquet | arrow | save_to_disk
    files: tuple[str, ...]    # the files read, in order (for save_to_disk: the folder)


def resolve_source(path: str) -> DataSource:
    """What ``path`` is, and the files it stands for; ValueError naming ``path`` when it is none of ``FORMATS``."""
    if os.path.isfile(path):
        if path.endswith(JSONL_SUFFIXES):
            return DataSource(path, "jsonl", (path,))
        if path.endswith(".parquet"):
            return DataSource(path, "parquet", (path,))
        if path.endswith(".arrow"):
            return DataSource(path, "arrow", (path,))
        raise ValueError(f"{path}: unknown data file type; expected {FORMATS}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
            raise ValueError(f"{path} is a DatasetDict folder; name one split, e.g. {os.path.join(path, splits[0])}"
                             if splits else f"{path} is an empty DatasetDict folder")
        if os.path.isfile(os.path.join(path, "state.json")):
            return DataSource(path, "save_to_disk", (path,))
        shards = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if shards:
            return DataSource(path, "parquet", tuple(shards))
        raise ValueError(f"{path}: a folder with no parquet shards and no save_to_disk state.json; expected {FORMATS}")
    raise ValueError(f"{path} does not exist")


def _saved_files(folder: str) -> list[str]:
    import json

    with open(os.path.join(folder, "state.json")) as handle:
        state = json.load(handle)
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    return [os.path.join(folder, name) for name in ["state.json", "dataset_info.json", *names]
            if os.path.exists(os.path.join(folder, name))]


def _file_print(path: str, sample: int = 1 << 16) -> list:
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(sample))
        if stat.st_size > sample:
            handle.seek(max(stat.st_size - sample, sample))
            digest.update(handle.read(sample))
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def fingerprint(source: DataSource) -> list:
    """Per file read: [absolute path, size, mtime_ns, hash of its first and last 64 KiB]."""
    files = _saved_files(source.files[0]) if source.kind == "save_to_disk" else source.files
    return [_file_print(f) for f in files]


def _batches_as_rows(batches, name: str, what: str) -> Iterator[dict]:
    """Rows from an iterator of column batches; a failure to read stops with ``name: cannot read ...``."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # pyarrow / datasets raise many types for a broken file; all mean the same here
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataFormatError(f"{name}: cannot read this {what} ({type(err).__name__}: {reason})") from None
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _dataset_batches(source: DataSource, file: str):
    datasets = _datasets()
    if source.kind == "parquet":
        stream = datasets.load_dataset("parquet", data_files=[os.path.abspath(file)], split="train", streaming=True)
    elif source.kind == "arrow":
        stream = datasets.Dataset.from_file(file)
    else:
        stream = datasets.load_from_disk(file)
        if not isinstance(stream, datasets.Dataset):
            raise ValueError(f"{file} holds a {type(stream).__name__}; name one split folder")
    return stream.iter(batch_size=BATCH_ROWS)


def _lazy(source: DataSource, file: str):
    """The batch iterator, opened on the first ``next`` so that opening errors are reported like reading errors."""
    yield from _dataset_batches(source, file)


def read_rows(source: DataSource) -> Iterator[tuple[object, str]]:
    """(row, "file:row") for every row of ``source``, in order; a file that cannot be read stops with its name."""
    if source.kind == "jsonl":
        yield from json_lines(source.path)
        return
    what = {"parquet": "parquet shard", "arrow": "Arrow file", "save_to_disk": "save_to_disk folder"}[source.kind]
    for file in source.files:
        for number, row in enumerate(_batches_as_rows(_lazy(source, file), file, what), start=1):
            yield row, f"{file}:{number}"


def row_count(source: DataSource) -> Optional[int]:
    """The number of rows when the files' metadata says so cheaply (parquet footers), else None."""
    if source.kind != "parquet":
        return None
    try:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in source.files)
    except Exception:  # an unreadable shard is reported, with its name, when it is read
        return None
