"""Data: chat records from JSONL / parquet / Arrow / save_to_disk -> chat-template token ids (tokenised once, cached
on disk, memory-mapped) -> training batches with response masks; DP sampling, optionally grouped by length.

Mask convention (see ``collate``): ``labels = input_ids`` shifted left by one, ``logits[b, t]`` scores
``labels[b, t]``, and ``loss_mask[b, t] = 1`` exactly where ``labels[b, t]`` is a response token (end-of-turn included).
"""
from .chat_tokenization import ChatTemplateTokenizer, TokenizedExample, TruncationStats
from .collate import (PromptBatch, TrainingBatch, batch_from_generations, collate_prompts, collate_training,
                      micro_batches, trim_generation)
from .dataset import ChatDataset, load_chat_dataset
from .records import ChatRecord, DataFormatError, Fields, read_jsonl
from .sampler import DistributedBatchSampler, training_sampler

__all__ = [
    "ChatDataset", "ChatRecord", "ChatTemplateTokenizer", "DataFormatError", "DistributedBatchSampler", "Fields",
    "PromptBatch",
    "TokenizedExample", "TrainingBatch", "TruncationStats", "batch_from_generations", "collate_prompts",
    "collate_training", "load_chat_dataset", "micro_batches", "read_jsonl", "training_sampler",
    "trim_generation",
]
