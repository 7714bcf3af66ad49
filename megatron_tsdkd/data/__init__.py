"""Data: JSONL chat records -> chat-template token ids -> training batches with response masks; DP sampling.

Mask convention (see ``collate``): ``labels = input_ids`` shifted left by one, ``logits[b, t]`` scores
``labels[b, t]``, and ``loss_mask[b, t] = 1`` exactly where ``labels[b, t]`` is a response token (end-of-turn included).
"""
from .chat_tokenization import ChatTemplateTokenizer, TokenizedExample, TruncationStats
from .collate import (PromptBatch, TrainingBatch, batch_from_generations, collate_prompts, collate_training,
                      micro_batches, trim_generation)
from .dataset import ChatDataset, load_chat_dataset
from .records import ChatRecord, DataFormatError, read_jsonl
from .sampler import DistributedBatchSampler

__all__ = [
    "ChatDataset", "ChatRecord", "ChatTemplateTokenizer", "DataFormatError", "DistributedBatchSampler", "PromptBatch",
    "TokenizedExample", "TrainingBatch", "TruncationStats", "batch_from_generations", "collate_prompts",
    "collate_training", "load_chat_dataset", "micro_batches", "read_jsonl", "trim_generation",
]
