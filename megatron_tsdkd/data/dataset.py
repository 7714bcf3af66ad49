"""A tokenised chat data set: rows (data/sources.py) -> records -> chat template -> length limits, with stats.

``mode`` decides what the same rows provide: ``off_policy`` keeps the data set's responses (teacher-generated responses
give sequence-level KD, lambda = 0), ``on_policy`` keeps prompts only, for the student to answer during training.
With a ``cache_dir`` the tokenised set is built once on disk and memory-mapped (data/token_cache.py); without one it
is held in memory, as small tools (tsdkd-eval) want.
"""
from __future__ import annotations

from typing import Optional

from .chat_dataset import ChatDataset, check_lengths, tokenized_chunks
from .chat_tokenization import ChatTemplateTokenizer, TruncationStats
from .records import DEFAULT_FIELDS, MODES, Fields, Mode
from .sources import resolve_source
from .token_cache import cached_dataset


def load_chat_dataset(path: str, tokenizer, mode: Mode = "off_policy", max_length: int = 512,
                      max_prompt_length: int = 256, end_of_turn_token: Optional[str] = None,
                      fields: Fields = DEFAULT_FIELDS, cache_dir: Optional[str] = None) -> ChatDataset:
    """Read and tokenise ``path`` (any format of data/sources.py): in memory, or through the on-disk cache in
    ``cache_dir`` (built once, memory-mapped). Raises ``DataFormatError`` at the first bad row, ValueError for a
    path that is no data set or when nothing is left."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_lengths(max_length, max_prompt_length)
    chat = ChatTemplateTokenizer(tokenizer, end_of_turn_token)
    source = resolve_source(path)
    if cache_dir:
        dataset = cached_dataset(source, chat, mode, max_length, max_prompt_length, fields, cache_dir)
    else:
        stats = TruncationStats()
        examples = [e for chunk in tokenized_chunks(source, chat, mode, max_length, max_prompt_length, fields, stats)
                    for e in chunk]
        dataset = ChatDataset(examples, stats, mode)
    if not len(dataset):
        raise ValueError(f"{path}: no usable examples ({dataset.stats.summary()})")
    return dataset
