"""Greedy answers from a Hugging Face causal LM, used to score the demo models before and after distillation."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.collate import collate_prompts, trim_generation


@torch.no_grad()
def greedy_responses(model, prompts: Sequence[Sequence[int]], eos_id: int, pad_id: int, max_new_tokens: int = 64,
                     batch_size: int = 64) -> list[list[int]]:
    """Each prompt's greedy continuation, cut after its first EOS (included)."""
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_prompts(prompts[start:start + batch_size], pad_id, padding_side="left")
        output = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                                pad_token_id=pad_id)
        new_tokens = output[:, batch.input_ids.shape[1]:]
        responses.extend(trim_generation(row, eos_id, pad_id) for row in new_tokens.tolist())
    model.train(was_training)
    return responses


def greedy_texts(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 batch_size: int = 64) -> list[str]:
    """Decoded greedy responses (special tokens removed), ready for ``answers.score``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = greedy_responses(model, prompts, tokenizer.eos_token_id, pad_id, max_new_tokens, batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
