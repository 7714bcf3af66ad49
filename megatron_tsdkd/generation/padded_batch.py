"""Prompts of different lengths as one left-padded token buffer, and the attention masks that hide the padding.

Left padding puts every row's newest token in the same column, so a step feeds one column [b, 1] and the KV
cache grows by one slot for all rows together. megatron's rope takes positions from the cache slot, not from
position ids, so a row with k pad tokens sees its tokens at positions k, k+1, ...; rope scores depend only on
the distance between query and key, and pad keys are masked, so the result equals that of an unpadded row
(this is what the HF comparison in tests/test_generation.py checks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_tsdkd.data.collate import collate_prompts


@dataclass
class PaddedBatch:
    tokens: torch.Tensor     # [b, prompt_len + max_new_tokens], pad-filled beyond what is known
    key_valid: torch.Tensor  # [b, same]: False at left padding
    prompt_len: int          # column where generated tokens start

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int,
                     device: torch.device) -> "PaddedBatch":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generation needs at least one prompt and no empty prompt")
        left = collate_prompts(prompts, pad_token_id, padding_side="left")   # the project's one left padding
        rows, prompt_len = left.input_ids.shape
        tokens = torch.full((rows, prompt_len + max_new_tokens), pad_token_id, dtype=torch.long)
        tokens[:, :prompt_len] = left.input_ids
        key_valid = torch.ones((rows, prompt_len + max_new_tokens), dtype=torch.bool)
        key_valid[:, :prompt_len] = left.attention_mask.bool()
        return cls(tokens.to(device), key_valid.to(device), prompt_len)

    def attention_mask(self, query_start: int, query_end: int) -> torch.Tensor:
        """[b, 1, q, k] True where query positions [query_start, query_end) may NOT attend to key positions
        [0, query_end): later positions (causal) and left padding."""
        device = self.tokens.device
        queries = torch.arange(query_start, query_end, device=device)[:, None]
        keys = torch.arange(query_end, device=device)[None, :]
        future = keys > queries                                  # [q, k]
        padding = ~self.key_valid[:, None, None, :query_end]     # [b, 1, 1, k]
        return future[None, None] | padding
