"""A tokenised chat data set held in memory: JSONL -> records -> chat template -> length limits, with stats.

``mode`` decides what the same JSONL provides: ``off_policy`` keeps the data set's responses (teacher-generated responses
give sequence-level KD, lambda = 0), ``on_policy`` keeps prompts only, for the student to answer during training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .chat_tokenization import ChatTemplateTokenizer, TokenizedExample, TruncationStats, fit_to_length
from .records import MODES, Mode, read_jsonl


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

    def for_epoch(self, epoch: int) -> "ChatDataset":
        """The examples of training epoch ``epoch``: the same every epoch here; a schedule (KPOD) varies them."""
        return self


def load_chat_dataset(path: str, tokenizer, mode: Mode = "off_policy", max_length: int = 512,
                      max_prompt_length: int = 256, end_of_turn_token: Optional[str] = None) -> ChatDataset:
    """Read and tokenise ``path``; raises ``DataFormatError`` at the first bad line, ValueError if nothing is left."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    chat = ChatTemplateTokenizer(tokenizer, end_of_turn_token)
    stats = TruncationStats()
    examples = []
    for record in read_jsonl(path, mode):
        example = fit_to_length(chat.encode_record(record), max_length, max_prompt_length, stats)
        if example is not None:
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no usable examples ({stats.summary()})")
    return ChatDataset(examples, stats, mode)
