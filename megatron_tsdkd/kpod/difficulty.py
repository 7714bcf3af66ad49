"""Step difficulty from the undistilled student under teacher forcing (METHOD.md KPOD 3):

    d_k = - sum_{j in step k} softmax_{j in step k}(w)_j * log P(r_j | r_<j, x)

computed with the project's vocab-parallel cross-entropy (losses/cross_entropy.py) on the student's vocab-sharded
logits: with float mask a_j = softmax_k(w)_j on step k's targets, cross_entropy_loss returns
sum_j a_j nll_j / #targets, so d_k = that value x #targets. ``weights_in_difficulty=False`` uses a uniform
softmax (w_j = 0), i.e. the step's mean NLL.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_tsdkd.data import collate_training
from megatron_tsdkd.losses import cross_entropy_loss


def step_masks(token_steps: Sequence[int], weights: Sequence[float], n_steps: int, use_weights: bool) -> list[list[float]]:
    """Per rationale step k, the softmax_k(w) weights laid on the response tokens (0 elsewhere)."""
    masks = []
    for k in range(n_steps):
        index = [j for j, s in enumerate(token_steps) if s == k]
        row = [0.0] * len(token_steps)
        if index:
            w = torch.tensor([weights[j] if use_weights else 0.0 for j in index], dtype=torch.float64)
            for j, a in zip(index, torch.softmax(w, 0).tolist()):
                row[j] = a
        masks.append(row)
    return masks


@torch.no_grad()
def step_difficulties(model, examples, token_steps, weights, n_steps, *, pad_id: int, vocab_size: int,
                      tp_group=None, device=None, use_weights: bool = True) -> list[list[float]]:
    """d_k for every step of every example; ``model(input_ids, position_ids, None)`` gives vocab-sharded logits
    (a megatron GPTModel on one pipeline stage; every TP rank calls this with the same examples)."""
    out = []
    for example, steps, w, n in zip(examples, token_steps, weights, n_steps):
        batch = collate_training([(example.prompt_ids, example.response_ids)], pad_id)
        if device is not None:
            batch = batch.to(device)
        logits = model(batch.input_ids, batch.position_ids, None)
        difficulties = []
        for mask in step_masks(steps, w, n, use_weights):
            weighted = collate_training([(example.prompt_ids, example.response_ids, mask)], pad_id).loss_mask
            weighted = weighted.to(batch.loss_mask.device)
            count = int((torch.tensor(mask) != 0).sum())
            if count == 0:
                difficulties.append(0.0)
                continue
            value = cross_entropy_loss(logits, batch.labels, weighted, tp_group=tp_group, vocab_size=vocab_size)
            difficulties.append(float(value) * count)
        out.append(difficulties)
    return out
