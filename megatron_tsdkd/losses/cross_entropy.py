"""Vocab-parallel cross-entropy on labels (SFT, Seq-KD), chunked like the distillation losses; its forward alone
gives log-likelihoods and greedy flags for evaluation (``label_log_probs``, lm-eval's loglikelihood).

Hand-written rather than megatron.core.tensor_parallel.vocab_parallel_cross_entropy because that one takes megatron's
global tensor-parallel group (this library takes any group, or None for one device), upcasts the whole
[tokens, V/TP] tensor at once, and knows nothing of padded vocabulary entries. Same maths: loss = logsumexp(z) -
z[label], d/dz = softmax(z) - onehot(label); the label's logit comes from its owning rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from megatron_tsdkd.losses.inputs import Targets, flatten_logits, positions_of
from megatron_tsdkd.losses.token_statistics import compute_dtype, upcast_rows
from megatron_tsdkd.losses.vocab_parallel import VocabShard, all_reduce_, global_max


def _targets(logits, labels, mask, tp_group, vocab_size, known: Optional[Targets] = None):
    """(2-D logits view, shard, flat target positions, their labels), with the labels checked: on the host from
    ``known`` (the collated batch's ``Targets``, no device read), else on the device (one read)."""
    flat = flatten_logits("student", logits, mask)
    if tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match mask shape {tuple(mask.shape)}")
    shard = VocabShard.of(flat, tp_group, vocab_size)
    targets = positions_of(mask, known)
    target_labels = labels.reshape(-1).index_select(0, targets).long()
    if known is not None:
        bad = next((label for label in known.label_range if not 0 <= label < shard.vocab_size), None)
    elif target_labels.numel() and (target_labels.min() < 0 or target_labels.max() >= shard.vocab_size):
        bad = target_labels[(target_labels < 0) | (target_labels >= shard.vocab_size)][0].item()
    else:
        bad = None
    if bad is not None and targets.numel():
        raise ValueError(f"label {bad} at a masked-in position is outside the vocabulary [0, {shard.vocab_size})")
    return flat, shard, targets, target_labels


def cross_entropy_loss(logits, labels, mask, tp_group=None, vocab_size=None, chunk_size: int = 1024,
                       targets: Optional[Targets] = None) -> torch.Tensor:
    """sum_t mask_t * (-log p(labels_t)) / #(mask != 0): a token mean for 0/1 masks, a weighted sum for float ones.
    ``targets``: the batch's host-side ``Targets`` (losses/inputs.py); None reads them off ``mask``."""
    flat, shard, targets, target_labels = _targets(logits, labels, mask, tp_group, vocab_size, targets)
    per_token = _CrossEntropyFunction.apply(flat, targets, target_labels, shard, int(chunk_size))
    weights = mask.reshape(-1).index_select(0, targets).to(per_token.dtype)
    return (per_token * weights).sum() / max(targets.numel(), 1)


@torch.no_grad()
def label_log_probs(logits, labels, mask, tp_group=None, vocab_size=None, chunk_size: int = 1024,
                    targets: Optional[Targets] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target (mask != 0, row-major): log p(label) in the compute dtype (fp32 for bf16 logits), and whether the
    label is the argmax over the real vocabulary (the first maximal column, as ``torch.argmax``: lm-eval's
    ``is_greedy``). The cross-entropy's chunked forward, without a graph: at most one chunk is ever upcast, and
    the greedy test rides on its all-reduce (no extra collective). ``targets`` as in ``cross_entropy_loss``."""
    flat, shard, targets, target_labels = _targets(logits, labels, mask, tp_group, vocab_size, targets)
    lse, label_logit, greedy = _label_terms(flat, targets, target_labels, shard, int(chunk_size), greedy=True)
    return label_logit - lse, greedy


def _label_logits(z: torch.Tensor, labels: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of z[label] -- 0 where another rank owns it, local column, owned flag)."""
    local = labels - shard.start
    owned = (local >= 0) & (local < shard.real_width)
    column = torch.where(owned, local, 0)
    if z.shape[1] == 0:
        return z.new_zeros(labels.shape), column, owned
    return torch.where(owned, z.gather(1, column.unsqueeze(1)).squeeze(1), 0.0), column, owned


def _label_terms(logits, targets, labels, shard: VocabShard, chunk_size: int, greedy: bool = False):
    """Chunk by chunk (one upcast chunk at a time): the log-normaliser and the label's logit of every target, and
    with ``greedy`` whether the label is the first maximal column: its logit is the maximum, and no rank's first
    maximal column (``argmax``) reaches the maximum before it (a 0/1 per rank, summed in the same all-reduce)."""
    dtype = compute_dtype(logits)
    n = targets.numel()
    lse = torch.zeros(n, dtype=dtype, device=logits.device)
    label_logit = torch.zeros_like(lse)
    is_greedy = torch.zeros(n if greedy else 0, dtype=torch.bool, device=logits.device)
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        z = upcast_rows(logits, targets[lo:hi], shard, dtype, 1.0)
        shift = global_max(z, shard)
        local_label, _, _ = _label_logits(z, labels[lo:hi], shard)
        z.sub_(shift.unsqueeze(1))
        parts = [local_label]
        if greedy and z.shape[1]:   # this rank's first maximal column, if it is the global maximum (0 after the shift)
            first = z.argmax(dim=1)
            at_max = z.gather(1, first.unsqueeze(1)).squeeze(1) == 0
            parts.append((at_max & (first + shard.start < labels[lo:hi])).to(dtype))
        elif greedy:                # a rank with no real column has no maximum
            parts.append(torch.zeros_like(local_label))
        sums = torch.stack([z.exp_().sum(dim=1), *parts], dim=1)
        all_reduce_(sums, shard)
        lse[lo:hi] = sums[:, 0].log() + shift
        label_logit[lo:hi] = sums[:, 1]
        if greedy:
            is_greedy[lo:hi] = (sums[:, 1] == shift) & (sums[:, 2] == 0)
    return lse, label_logit, is_greedy


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, labels, shard, chunk_size):
        lse, label_logit, _ = _label_terms(logits, targets, labels, shard, chunk_size)
        loss = lse - label_logit
        ctx.save_for_backward(logits, targets, labels, lse)
        ctx.shard, ctx.chunk_size = shard, chunk_size
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, targets, labels, lse = ctx.saved_tensors
        shard, chunk = ctx.shard, ctx.chunk_size
        grad_logits = torch.zeros_like(logits)
        for lo in range(0, targets.numel(), chunk):
            hi = min(targets.numel(), lo + chunk)
            grad = upcast_rows(logits, targets[lo:hi], shard, compute_dtype(logits), 1.0)
            grad.sub_(lse[lo:hi].unsqueeze(1)).exp_()                      # softmax
            _, column, owned = _label_logits(grad, labels[lo:hi], shard)
            if grad.shape[1]:
                grad.scatter_add_(1, column.unsqueeze(1), -owned.to(grad.dtype).unsqueeze(1))
            grad.mul_(grad_loss[lo:hi].unsqueeze(1))
            grad_logits[targets[lo:hi], : shard.real_width] = grad.to(grad_logits.dtype)
        return grad_logits, None, None, None, None
