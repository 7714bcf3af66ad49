"""Sequence-level indirect feedback (METHOD.md section 3, ``indirect_level: sequence``): the student proposes whole
responses, the teacher re-ranks them, and the student learns the teacher's order of its own candidates.

For a prompt x with n sampled responses y^1..y^n (rollout.num_samples; rows of one micro-batch with the same prompt):

    ell_M(y) = (1 / |y|) sum_t log p_M(y_t | x, y_<t)        M = student S or teacher T; |y| its targets (EOS included)
    pi       = the candidates sorted by ell_T, highest first (ties: row order, as losses/tsdkd.teacher_ordered)
    L(x)     = - sum_j [ ell_S(y^pi_j) - logsumexp_{k >= j} ell_S(y^pi_k) ]          (Plackett-Luce NLL)
    L_seq    = mean of L(x) over the micro-batch's prompts

Log-probabilities are at temperature 1 (the likelihood of the responses as sampled) and come from the vocab-parallel
cross-entropy (losses/cross_entropy.py: per token logsumexp(z) - z[y_t], chunked, the label's logit from its owning
rank, exact gradient across TP); only the teacher's ordering is used, so it carries no gradient.

Why not plackett_luce_nll on a [prompts, n] view: that needs n on the host, and the loss sees only the batch. The
groups are read off the batch on the device instead (rows whose prompt tokens are equal), so the same sum is written
per row i with a [B, B] mask "k is ranked at or below i within i's group":
    L(x) = - sum_{i in x} [ ell_S(y^i) - logsumexp_{k in x, rank_T(k) >= rank_T(i)} ell_S(y^k) ]
which equals the Plackett-Luce NLL of the teacher's order term by term (tests/test_sequence_ranking.py checks it
against plackett_luce_nll on dense logits). A prompt with one candidate (or rows without targets) adds 0.
"""
from __future__ import annotations

import torch

from megatron_tsdkd.losses.cross_entropy import _CrossEntropyFunction
from megatron_tsdkd.losses.inputs import Targets, check_same_shard, flatten_logits, positions_of
from megatron_tsdkd.losses.vocab_parallel import VocabShard


def same_prompt(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: rows i and k hold the same prompt (equal length, equal tokens), i.e. candidates of one prompt."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = columns.unsqueeze(0) < prompt_lengths.unsqueeze(1)                       # [B, L]
    equal = (input_ids.unsqueeze(1) == input_ids.unsqueeze(0)) | ~in_prompt.unsqueeze(1)   # [B, B, L]
    return equal.all(dim=-1) & (prompt_lengths.unsqueeze(1) == prompt_lengths.unsqueeze(0))


def response_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, shard: VocabShard,
                             chunk_size: int, targets: Targets | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row: mean over its targets of log p(label), targets per row); 0 for a row without targets."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = positions_of(mask, targets)
    labels = labels.reshape(-1).index_select(0, targets).long()
    token_log_p = -_CrossEntropyFunction.apply(flat, targets, labels, shard, int(chunk_size))
    rows = torch.div(targets, mask.shape[1], rounding_mode="floor")
    totals = token_log_p.new_zeros(mask.shape[0]).index_add(0, rows, token_log_p)
    counts = (mask != 0).sum(dim=1)
    return totals / counts.clamp(min=1).to(totals.dtype), counts


def sequence_ranking_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                          mask: torch.Tensor, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, tp_group=None,
                          vocab_size: int | None = None, chunk_size: int = 1024,
                          targets: Targets | None = None) -> torch.Tensor:
    """L_seq over logits [batch, seq, V/TP] (module docstring); fp32 scalar, differentiable w.r.t. the student.
    ``targets``: the batch's host-side ``Targets`` (losses/inputs.py); None reads them off ``mask``."""
    student = flatten_logits("student", student_logits, mask)
    check_same_shard(student, flatten_logits("teacher", teacher_logits, mask))
    if tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match mask shape {tuple(mask.shape)}")
    shard = VocabShard.of(student, tp_group, vocab_size)
    scores, counts = response_log_likelihoods(student_logits, labels, mask, shard, chunk_size, targets)
    with torch.no_grad():
        teacher, _ = response_log_likelihoods(teacher_logits.detach(), labels, mask, shard, chunk_size, targets)
    valid = counts > 0
    rows = torch.arange(mask.shape[0], device=mask.device)
    group = same_prompt(input_ids, prompt_lengths) & valid.unsqueeze(0) & valid.unsqueeze(1)
    # below[i, k]: k is in i's group and ranked at or below i (lower teacher score; ties: later row). The diagonal
    # is always set, so every logsumexp is finite (rows without targets are then weighted out).
    ranked_below = (teacher.unsqueeze(0) < teacher.unsqueeze(1)) | (
        (teacher.unsqueeze(0) == teacher.unsqueeze(1)) & (rows.unsqueeze(0) >= rows.unsqueeze(1)))
    below = (group & ranked_below) | torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
    normaliser = torch.logsumexp(torch.where(below, scores.unsqueeze(0), float("-inf")), dim=1)
    per_row = torch.where(valid, normaliser - scores, 0.0)
    # One prompt per group: count each group at its first valid row.
    first = valid & ~(group & (rows.unsqueeze(0) < rows.unsqueeze(1))).any(dim=1)
    return per_row.sum() / first.sum().clamp(min=1).to(per_row.dtype)
