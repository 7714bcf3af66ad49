"""Plackett-Luce negative log-likelihood of a ranking, shared by the token- and sequence-level indirect terms."""
from __future__ import annotations

import torch


def plackett_luce_nll(scores_in_teacher_order: torch.Tensor, reference_compat: bool = False) -> torch.Tensor:
    """-sum_j [s_j - logsumexp(s_j, ..., s_K)] over the last dimension, with s ordered by the teacher (best first).

    Works on any leading shape (one NLL per leading index): token-level candidates [n, K] or the length-normalised
    log-probabilities of n sampled responses [prompts, n]. ``reference_compat`` reproduces the released code, whose
    normaliser runs over s_1..s_j (a forward cumulative logsumexp): the likelihood of the REVERSED ranking.
    """
    s = scores_in_teacher_order
    if s.dim() == 0 or s.shape[-1] == 0:
        raise ValueError(f"plackett_luce_nll needs at least one score per ranking, got shape {tuple(s.shape)}")
    if reference_compat:
        normaliser = torch.logcumsumexp(s, dim=-1)
    else:
        normaliser = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    return -(s - normaliser).sum(dim=-1)
