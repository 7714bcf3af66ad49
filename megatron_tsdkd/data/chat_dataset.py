"""A tokenised chat data set held in memory (``ChatDataset``; the memory-mapped one extends it, token_store.py),
and the one tokenising pass that both build from: rows -> records -> chat template -> length limits, a chunk at a
time (``tokenized_chunks``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from .chat_tokenization import ChatTemplateTokenizer, TokenizedExample, TruncationStats, fit_to_length
from .records import Fields, Mode, parse_record
from .sources import DataSource, read_rows

CHUNK_ROWS = 512


@dataclass
class WeightedExample(TokenizedExample):
    """An example whose response tokens carry float loss weights (KPOD): ``loss_mask`` takes them as they are."""
    response_weights: list[float] = field(default_factory=list)


class ChatDataset:
    def __init__(self, examples: list[TokenizedExample], stats: TruncationStats, mode: Mode):
        self.examples = examples
        self.stats = stats
        self.mode = mode

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    def prompt_lengths(self) -> np.ndarray:
        return np.asarray([len(e.prompt_ids) for e in self.examples], dtype=np.int64)

    def response_lengths(self) -> np.ndarray:
        return np.asarray([len(e.response_ids) for e in self.examples], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """Tokens per example (prompt + response; the prompt alone on-policy): what length-grouped sampling sorts."""
        return self.prompt_lengths() + self.response_lengths()

    def for_epoch(self, epoch: int) -> "ChatDataset":
        """The examples of training epoch ``epoch``: the same every epoch here; a schedule (KPOD) varies them."""
        return self


def tokenized_chunks(source: DataSource, chat: ChatTemplateTokenizer, mode: Mode, max_length: int,
                     max_prompt_length: int, fields: Fields, stats: TruncationStats,
                     progress: Optional[Callable[[int], None]] = None) -> Iterator[list[TokenizedExample]]:
    """The kept examples of ``source``, a chunk at a time; ``progress(rows)`` after each chunk."""
    records = []

    def encode():
        kept = [fit_to_length(e, max_length, max_prompt_length, stats) for e in chat.encode_records(records)]
        if progress is not None:
            progress(len(records))
        return [e for e in kept if e is not None]

    for obj, where in read_rows(source):
        records.append(parse_record(obj, where, mode, fields))
        if len(records) == CHUNK_ROWS:
            yield encode()
            records = []
    if records:
        yield encode()


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
