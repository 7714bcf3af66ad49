"""The token facts every consumer of a model needs, computed once from the tokenizer and the model configs.

- ``stop_ids``: where a response ends: the chat template's end-of-turn token, the tokenizer's EOS, and every
  ``eos_token_id`` of the models' ``generation_config.json`` (Llama 3 lists several);
- ``pad_id``: the tokenizer's pad token, else its EOS (the chat tokenizer's rule, data/chat_tokenization.py);
- ``vocab_size``: the REAL vocabulary, the tokenizer's size: ids at or above it are embedding rows no token uses
  (Qwen2.5 pads to 151,936 / 152,064 rows); they are never targets and never sampled;
- ``padded_vocab_size``: the rows both models are built with here: each model's rows rounded up for TP, the larger
  of teacher and student, so their vocab shards line up in the losses.
Training, evaluation and teacher-data generation all take their ``TokenSpec`` from ``token_spec``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

from megatron_tsdkd.models.builder import padded_vocab_size
from megatron_tsdkd.models.errors import ModelError
from megatron_tsdkd.models.hf_config import ArchSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TokenSpec:
    stop_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    padded_vocab_size: int


def shared_padded_vocab(specs: Sequence[ArchSpec], tp: int) -> int:
    """Teacher and student on one padded vocabulary: the larger of their TP-padded row counts."""
    return max(padded_vocab_size(s.vocab_size, tp) for s in specs)


def load_tokenizer(folder: str):
    """The tokenizer saved in a local folder (never the hub); ModelError naming the folder if there is none."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise ModelError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder}")
    return AutoTokenizer.from_pretrained(folder)


def generation_eos_ids(meta_dir: str) -> set[int]:
    path = os.path.join(meta_dir, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        value = json.load(f).get("eos_token_id")
    return set(value if isinstance(value, list) else [] if value is None else [value])


def token_spec(chat, sources: Sequence, tp: int) -> TokenSpec:
    """``chat``: the ChatTemplateTokenizer (tokenizer + end-of-turn id); ``sources``: the ModelSources that will
    be built (student first). ModelError when a model has fewer embedding rows than the tokenizer has tokens."""
    tokenizer = chat.tokenizer
    vocab = len(tokenizer)
    for source in sources:
        if source.arch.vocab_size < vocab:
            raise ModelError(f"{source.path}: the embedding has {source.arch.vocab_size} rows but the tokenizer has "
                             f"{vocab} tokens")
    stops = {chat.end_of_turn_id, tokenizer.eos_token_id} - {None}
    for source in sources:
        stops |= generation_eos_ids(source.meta_dir)
    stops = {i for i in stops if 0 <= i < vocab}
    if not stops:
        raise ModelError("no end-of-turn token: neither the tokenizer nor generation_config.json names one")
    return TokenSpec(tuple(sorted(stops)), chat.pad_id, vocab, shared_padded_vocab([s.arch for s in sources], tp))
