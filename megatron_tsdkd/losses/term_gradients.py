"""Which loss term drives the update: each term's gradient norm on the student logits and its share of the total.

For a loss L = sum_i L_i (the terms already carrying their weights, e.g. L_direct, gamma_em * L_em,
alpha * L_indirect) and student logits z (vocab-sharded [batch, seq, V/TP] over the TP group):

    g_i       = dL_i / dz                                  (the term's own backward, one term at a time)
    ||g_i||   = sqrt( sum_{ranks r} ||g_i^(r)||^2 )        (local shard norms squared, summed over the TP group)
    share_i   = ||g_i|| / sum_j ||g_j||                    (0 for every term when all gradients vanish)

Shares are of norms, not of squared norms, and ignore the angles between the g_i: they say how loud each term
is, not how much of the update's direction it sets. They are invariant to the trainer's per-token weighting
(a common factor of every term). Costly (one extra backward of the loss head per term, each holding one
shard-sized gradient until its norm is taken): run at diagnostic steps for the diagnostics, and on every micro-batch
only when ``method.balance=shares`` needs the norms (losses/term_balance.py; the diagnostics then reuse them).
"""
from __future__ import annotations

import torch

from megatron_tsdkd.runtime.collectives import all_reduce_values


def term_gradient_norms(terms: dict[str, torch.Tensor], logits: torch.Tensor, tp_group=None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: ||dL_i/dz||}, {name: share_i}) over the full vocabulary, as device scalars (no host sync), fp32
    (fp64 for fp64 logits).

    ``terms`` are differentiable scalars whose graphs reach ``logits`` (a term without a gradient path, e.g. a
    switched-off term, has norm 0); the graphs are retained for the real backward that follows.
    """
    if not logits.requires_grad:
        raise ValueError("term gradient norms need student logits that require grad (a training step)")
    dtype = torch.promote_types(logits.dtype, torch.float32)   # fp32 sums for low precision, fp64 stays fp64
    squares = []
    for term in terms.values():
        if term.requires_grad:
            grad = torch.autograd.grad(term, logits, retain_graph=True, allow_unused=True)[0]
        else:
            grad = None
        squares.append(logits.new_zeros((), dtype=dtype) if grad is None
                       else torch.linalg.vector_norm(grad, dtype=dtype).square())
        del grad   # one shard-sized gradient alive at a time
    squares = torch.stack(squares)
    if tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1:
        squares = all_reduce_values(squares, group=tp_group, dtype=dtype)
    norms = squares.sqrt()
    total = norms.sum()
    shares = torch.where(total > 0, norms / total.clamp_min(torch.finfo(dtype).tiny), 0.0)
    return dict(zip(terms, norms)), dict(zip(terms, shares))
