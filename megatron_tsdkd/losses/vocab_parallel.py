"""Primitives over vocab-sharded logits: which columns a rank owns, the collectives, normaliser, top-K, gathers.

Each tensor-parallel rank r holds logits[..., r*W:(r+1)*W] of a vocabulary padded to W*TP columns; columns at or
above ``vocab_size`` are not real tokens and count as -inf in every softmax. Per token only a few scalars cross
ranks. Written by hand (megatron-core's equivalents take its global tensor-parallel group, only do cross-entropy,
and have no top-K); the gradient rule for replicated losses follows megatron-core's mappings: an all-reduce SUM in
forward is the identity in backward, because every rank back-propagates the same loss into its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's columns sit in the common padded vocabulary, and how many of them are real tokens."""
    group: object            # torch.distributed ProcessGroup, or None for one device
    rank: int
    world_size: int
    width: int               # columns held by this rank (V / TP)
    vocab_size: int          # real vocabulary size over all ranks

    @property
    def start(self) -> int:
        return self.rank * self.width

    @property
    def real_width(self) -> int:
        """Columns of this shard that are real tokens (the rest are padding)."""
        return max(0, min(self.width, self.vocab_size - self.start))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def of(cls, logits: torch.Tensor, tp_group=None, vocab_size: int | None = None) -> "VocabShard":
        width = logits.shape[-1]
        if tp_group is None:
            rank, world = 0, 1
        else:
            rank, world = dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)
        padded = width * world
        if vocab_size is None:
            vocab_size = padded
        if not 1 <= vocab_size <= padded:
            raise ValueError(f"vocab_size = {vocab_size} must lie in [1, {padded}] (shard width {width} x TP {world})")
        return cls(tp_group if world > 1 else None, rank, world, width, int(vocab_size))


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_(tensor: torch.Tensor, shard: VocabShard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce, not differentiable: only for statistics or inside a hand-written backward."""
    if shard.distributed:
        dist.all_reduce(tensor, op=op, group=shard.group)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward; identity in backward (the loss, hence grad_output, is replicated)."""

    @staticmethod
    def forward(ctx, tensor, shard):
        return all_reduce_(tensor.clone(), shard)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def all_reduce_sum(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Differentiable all-reduce SUM of per-rank partial results (gradient-exact for replicated losses)."""
    return _AllReduceSum.apply(tensor, shard) if shard.distributed else tensor


def all_gather_last_dim(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dimension, in rank order (not differentiable)."""
    if not shard.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(shard.world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=shard.group)
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------- primitives
def real_columns(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The view of this shard's columns that are real tokens (padding dropped instead of set to -inf)."""
    return logits[..., : shard.real_width]


def mask_padded_vocab(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Logits with -inf at the padded vocabulary entries (ids >= vocab_size), for dense code paths."""
    if shard.real_width == shard.width:
        return logits
    return logits.masked_fill(torch.arange(shard.width, device=logits.device) >= shard.real_width, float("-inf"))


def global_max(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Per-token max over the real vocabulary of all ranks (all-reduce MAX; carries no gradient)."""
    local = real_columns(logits, shard).detach()
    if local.shape[-1] == 0:
        result = torch.full(local.shape[:-1], float("-inf"), dtype=local.dtype, device=local.device)
    else:
        result = local.amax(dim=-1)
    return all_reduce_(result, shard, op=dist.ReduceOp.MAX)


def log_normalizer(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Differentiable log sum_v exp(logits_v) over the full real vocabulary: max shift, then an all-reduced sum-exp."""
    shift = global_max(logits, shard)
    local_sum = torch.exp(real_columns(logits, shard) - shift.unsqueeze(-1)).sum(dim=-1)
    return torch.log(all_reduce_sum(local_sum, shard)) + shift


def topk_global(logits: torch.Tensor, k: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k (values, vocabulary ids) over the real vocabulary, largest first; no gradient.

    Local top-k, all-gather of k x TP (value, global id) pairs, then the top-k of those: exact, since every global
    top-k entry is in its owner's local top-k.
    """
    if k > shard.vocab_size:
        raise ValueError(f"top_k = {k} exceeds the real vocabulary size {shard.vocab_size}")
    local = real_columns(logits, shard).detach()
    local_k = min(k, local.shape[-1])
    values, ids = torch.topk(local, local_k, dim=-1) if local_k else (local[..., :0], local[..., :0].long())
    if local_k < k:  # a shard with fewer real columns than k pads its candidates with -inf
        pad_shape = (*local.shape[:-1], k - local_k)
        values = torch.cat([values, values.new_full(pad_shape, float("-inf"))], dim=-1)
        ids = torch.cat([ids, ids.new_zeros(pad_shape)], dim=-1)
    values = all_gather_last_dim(values, shard)
    ids = all_gather_last_dim(ids + shard.start, shard)
    best_values, where = torch.topk(values, k, dim=-1)
    return best_values, ids.gather(-1, where)


def gather_global_ids(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """logits[..., ids] for global vocabulary ids: the owning rank contributes the value, the others 0, then a sum.

    Differentiable (gradient lands on the owner's shard only).
    """
    if logits.shape[-1] == 0:  # a shard with no real column owns nothing (kept in the graph for autograd)
        return all_reduce_sum((logits.sum(-1, keepdim=True) * 0).expand(ids.shape), shard)
    local_ids = ids - shard.start
    owned = (local_ids >= 0) & (local_ids < shard.real_width)
    local = logits.gather(-1, torch.where(owned, local_ids, torch.zeros_like(local_ids)))
    local = torch.where(owned, local, torch.zeros_like(local))
    return all_reduce_sum(local, shard)
