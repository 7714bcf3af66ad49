"""Shape checks and flattening shared by every loss: [batch, seq, V/TP] logits, [batch, seq] masks -> 2-D views;
and the response targets, found where the batch is built (``Targets``) or, failing that, read off the mask."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def flatten_logits(name: str, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, V/TP] aligned with mask [batch, seq] -> a [batch * seq, V/TP] view (no copy if contiguous)."""
    if logits.dim() != 3:
        raise ValueError(f"{name} logits must be [batch, seq, V/TP], got shape {tuple(logits.shape)}")
    if tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} logits [batch, seq] = "
                         f"{tuple(logits.shape[:2])}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} logits must be floating point, got {logits.dtype}")
    return logits.reshape(-1, logits.shape[-1])


def check_same_shard(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"teacher logits shard {tuple(teacher.shape)} differs from student logits shard "
                         f"{tuple(student.shape)}; lay both models on one common padded vocabulary")


@dataclass(frozen=True)
class Targets:
    """The response targets of one [batch, seq] mask and its labels, known on the host where the batch is built
    (data/collate.py): so a loss neither runs ``nonzero`` on the mask nor checks the labels on the device, two host
    syncs per micro-batch on GPU. ``positions`` may live on the device; the rest are plain numbers."""
    positions: torch.Tensor        # [n] long: flat row-major indices of mask != 0, as target_positions(mask) gives
    shape: tuple[int, int]         # the mask's [batch, seq]: the positions index its flat view
    label_range: tuple[int, int]   # (smallest, largest) label id at a target; (0, 0) when there is none

    def to(self, device) -> "Targets":
        return Targets(self.positions.to(device, non_blocking=True), self.shape, self.label_range)


def target_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of the response targets, mask != 0. A device read (``nonzero``): for callers
    without a collated batch (evaluation); the training step passes its ``Targets``."""
    return torch.nonzero(mask.reshape(-1) != 0, as_tuple=False).view(-1)


def positions_of(mask: torch.Tensor, targets: Optional[Targets]) -> torch.Tensor:
    """The targets' flat positions: the host's when given (checked against the mask's shape), else read off
    ``mask``."""
    if targets is None:
        return target_positions(mask)
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"targets were collated for a [batch, seq] = {tuple(targets.shape)} mask, got "
                         f"{tuple(mask.shape)}; a re-padded batch needs its targets rebuilt (or none)")
    return targets.positions


def token_mean(per_token: torch.Tensor, count: int) -> torch.Tensor:
    """sum / count, and an exact (differentiable) 0 when there are no targets."""
    return per_token.sum() / max(count, 1)
