"""Shape checks and flattening shared by every loss: [batch, seq, V/TP] logits, [batch, seq] masks -> 2-D views."""
from __future__ import annotations

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


def target_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (row-major) of the response targets, mask != 0."""
    return torch.nonzero(mask.reshape(-1) != 0, as_tuple=False).view(-1)


def token_mean(per_token: torch.Tensor, count: int) -> torch.Tensor:
    """sum / count, and an exact (differentiable) 0 when there are no targets."""
    return per_token.sum() / max(count, 1)
