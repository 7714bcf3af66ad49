"""The released TSD-KD code's loss rules (``reference_compat``; docs/METHOD.md section 6), on per-token scalars.

The released code (github kmswin1/TSD-KD, DistillTrainer.py, a TRL 0.21 GKDTrainer subclass) computes its loss on
the micro-batch's completion block: [B, G] positions, row i's from its prompt end on, G the micro-batch's completion
width (its longest response with the end token). Row i holds r_i targets, then G - r_i positions that are not
(its end token and pads, since pad == eos masks both), and every rule below sees those:
- the entropy set: every block position (targets, pads and rows without any target alike) whose student entropy
  is >= the ``rho`` quantile of the targets' entropies (the quantile taken in fp32, as the released code does);
- the opener: ONE length d for the micro-batch, the first index where the cumulative share (fp32) of the targets'
  entropies, flattened row-major, reaches the fraction (the crossing itself excluded; d = 0 when it is never
  reached); the ranking term is taken at the targets among the first d columns of every row's block, a sum over
  them divided by their count (0 when there are none).
Our rows are right-padded prompt + response (data/collate.py), so the block is a view built from each row's start
column (prompt length - 1): ``completion_block``. Written by hand: it is a reading of the released code, no library
offers it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class CompletionBlock(NamedTuple):
    positions: torch.Tensor   # [n] distinct flat indices into the [B * L] rows, ascending: where to compute statistics
    inverse: torch.Tensor     # [B, G] for each block position, its index into ``positions``
    target: torch.Tensor      # [B, G] bool, the block position is a target


def completion_block(mask: torch.Tensor, start: Optional[torch.Tensor] = None) -> CompletionBlock:
    """The released code's [B, G] completion block over rows [B, L] whose targets are ``mask != 0``.

    ``start`` None: the rows ARE the block (the released code's own tensors; G = L). Otherwise row i's block is
    columns start[i] .. start[i] + G - 1, G the widest extent from a row's start to its last target (with our
    collation: the longest response, end token included). Where a row's block runs past L (a long prompt in a
    micro-batch with a long response elsewhere: the positions do not exist in our layout), the missing pads
    repeat the row's last column, which the collate convention keeps a pad; they count as pads, never as targets.
    One host synchronisation (G sizes the block).
    """
    rows, length = mask.shape
    is_target = mask != 0
    if start is None:
        inverse = torch.arange(rows * length, device=mask.device).view(rows, length)
        return CompletionBlock(inverse.reshape(-1), inverse, is_target)
    start = start.to(device=mask.device, dtype=torch.long)
    columns = torch.arange(length, device=mask.device)
    last = torch.where(is_target, columns, -1).amax(dim=1)
    width = max(int((last - start + 1).clamp(min=0).max()), 1)
    block_columns = start.unsqueeze(1) + torch.arange(width, device=mask.device)
    inside = block_columns < length
    block_columns = block_columns.clamp(max=length - 1)
    flat = block_columns + length * torch.arange(rows, device=mask.device).unsqueeze(1)
    positions, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    target = inside & is_target.gather(1, block_columns)
    return CompletionBlock(positions, inverse, target)


def entropy_selection(entropy: torch.Tensor, block: CompletionBlock, rho: float) -> torch.Tensor:
    """Indices into ``entropy`` (one per block position, repeats included) of the released entropy set: block
    positions with H_S >= the rho quantile (fp32) of the targets' H_S."""
    entropy = entropy.detach()
    threshold = torch.quantile(entropy.index_select(0, block.inverse[block.target]).float(), rho)
    flat = block.inverse.reshape(-1)
    return flat[entropy.index_select(0, flat) >= threshold]


def opener_length(target_entropy: torch.Tensor, fraction: float) -> int:
    """The released batch-wide opener length: the first index where the cumulative share (fp32, normalised first)
    of the flattened targets' entropies reaches ``fraction``; 0 when none does (argmax over no hit)."""
    share = target_entropy.detach().float()
    share = share / share.sum()
    return int((torch.cumsum(share, dim=0) >= fraction).float().argmax())


def opener_targets(block: CompletionBlock, length: int) -> torch.Tensor:
    """Indices into the statistics of the targets among the first ``length`` columns of every row's block."""
    return block.inverse[:, :length][block.target[:, :length]]
