"""The TSD-KD loss (docs/METHOD.md): gated generalized JSD + entropy regularisation + teacher re-ranking.

    L = L_direct + gamma_em * L_em + alpha * L_indirect

Written by hand (no library implements it; the released reference is a TRL subclass on dense logits). One chunked
pass over the vocab-sharded logits (token_statistics) yields per token the JSD, both entropies and the student's
top-K candidates with the teacher's logits at them; everything below works on those per-token scalars, so no
[tokens, V] tensor is ever materialised in fp32. Selections (gate, entropy set, opener, candidates, ranking) are
detached. ``reference_compat`` switches to the released code's behaviour (METHOD.md section 6); its fourth item,
pad == eos masking, belongs to the data pipeline, not to the loss.

Diagnostics (``diagnose=True``, at logging steps only; detached fp32 scalars named as TensorBoard shows them):
- grad_norm/<term>, grad_share/<term> for term in direct, entropy, indirect: the norm of d(term)/d(student logits)
  of the weighted terms L_direct, gamma_em * L_em, alpha * L_indirect, and norm / sum of the three norms
  (losses/term_gradients.py; 0 for a switched-off term);
- select/student_entropy, select/teacher_entropy: mean H_S, H_T over the entropy set I (computed for the
  diagnostics even when use_entropy is off); select/top1_agreement: the fraction of I where
  argmax p_S = argmax p_T;
- rerank/teacher_mass_beyond_top1: mean over opener positions of sum_{j=2..K} p_T(c_j), the teacher's
  probability (at temperature T) of the candidates it ranks below its favourite (0 when use_indirect is off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_tsdkd.losses.config import TSDKDLossConfig
from megatron_tsdkd.losses.inputs import check_same_shard, flatten_logits, target_positions, token_mean
from megatron_tsdkd.losses.plackett_luce import plackett_luce_nll
from megatron_tsdkd.losses.term_gradients import term_gradient_norms
from megatron_tsdkd.losses.token_statistics import Divergence, token_statistics
from megatron_tsdkd.losses.vocab_parallel import VocabShard


@dataclass
class TSDKDLossOutput:
    loss: torch.Tensor            # the total, differentiable
    direct: torch.Tensor          # L_direct
    entropy: torch.Tensor         # L_em (0 when use_entropy is off)
    indirect: torch.Tensor        # L_indirect (0 when use_indirect is off)
    gate_mean: torch.Tensor       # mean gate w_t over targets (1 when use_gate is off)
    opener_length: torch.Tensor   # mean opener length over responses (0 when use_indirect is off)
    selected_count: torch.Tensor  # |I|, positions in the entropy term (0 when use_entropy is off)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)   # DIAGNOSTICS when diagnose, else empty


TERMS = ("direct", "entropy", "indirect")
DIAGNOSTICS = (*(f"grad_norm/{t}" for t in TERMS), *(f"grad_share/{t}" for t in TERMS), "select/student_entropy",
               "select/teacher_entropy", "select/top1_agreement", "rerank/teacher_mass_beyond_top1")


def tsdkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               config: TSDKDLossConfig = TSDKDLossConfig(), tp_group=None, vocab_size: int | None = None,
               diagnose: bool = False) -> TSDKDLossOutput:
    """TSD-KD over logits [batch, seq, V/TP] (logits[b, t] scores the target at t; mask[b, t] != 0 marks targets).

    ``diagnose`` also fills ``diagnostics`` (module docstring): one extra backward per term, so logging steps only.
    """
    student = flatten_logits("student", student_logits, mask)
    teacher = flatten_logits("teacher", teacher_logits, mask)
    check_same_shard(student, teacher)
    shard = VocabShard.of(student, tp_group, vocab_size)
    if config.use_indirect and config.top_k > shard.vocab_size:
        raise ValueError(f"TSDKDLossConfig.top_k = {config.top_k} exceeds the real vocabulary size {shard.vocab_size}")
    compat = config.reference_compat
    # The reference code sees each row's response region (first target to row end, pads included); the paper, targets.
    positions = response_region(mask) if compat else target_positions(mask)
    stats = token_statistics(student, teacher, positions, Divergence.generalized_jsd(config.beta), shard,
                             temperature=config.temperature, chunk_size=config.chunk_size,
                             top_k=config.top_k if config.use_indirect else 0, argmax=diagnose)
    on_target = torch.nonzero(mask.reshape(-1).index_select(0, positions) != 0).view(-1)  # into `positions`
    count = on_target.numel()
    h_s, h_t = stats.student_entropy, stats.teacher_entropy
    zero = h_s.new_zeros(())

    gate = entropy_gate(h_s, h_t, config.tau) if config.use_gate else torch.ones_like(h_t)
    gate, divergence = gate.index_select(0, on_target), stats.divergence.index_select(0, on_target)
    direct = token_mean(gate * divergence, count)
    gate_mean = token_mean(gate, count) if count else zero + 1.0

    entropy, selected_count, selected = zero, 0, None
    if (config.use_entropy or diagnose) and count:
        if compat:
            selected = reference_entropy_selection(h_s, on_target, config.rho)
        else:
            selected = on_target.index_select(0, top_entropy_selection(h_s.index_select(0, on_target), config.rho))
    if config.use_entropy and count:
        entropy, selected_count = h_s.index_select(0, selected).mean(), selected.numel()

    indirect, opener_length, beyond_top1 = zero, zero, zero
    if config.use_indirect and count:
        rows = positions // mask.shape[1]
        if compat:
            opener, length = reference_opener(h_s, on_target, rows, positions % mask.shape[1], mask,
                                              config.opener_fraction)
            opener_length = zero + length
            if opener.numel():
                indirect = ranking_nll(stats, opener, compat).mean()
                if diagnose:
                    beyond_top1 = teacher_mass_beyond_top1(stats, opener).mean()
        else:  # every target ranked, the opener's kept by a mask: no data-dependent gather, no host sync
            keep, lengths = opener_selection(h_s.index_select(0, on_target), rows.index_select(0, on_target),
                                             config.opener_fraction, *mask.shape)
            opener_length = lengths.sum() / (lengths > 0).sum()
            indirect = torch.where(keep, ranking_nll(stats, on_target, compat), 0.0).sum() / keep.sum()
            if diagnose:
                beyond_top1 = torch.where(keep, teacher_mass_beyond_top1(stats, on_target), 0.0).sum() / keep.sum()

    loss = direct
    if config.use_entropy:
        loss = loss + config.gamma_em * entropy
    if config.use_indirect:
        loss = loss + config.alpha * indirect
    out = TSDKDLossOutput(loss, direct, entropy, indirect, gate_mean.detach(), opener_length.detach(),
                          zero + selected_count)
    if diagnose:
        weighted = {"direct": direct, "entropy": config.gamma_em * entropy if config.use_entropy else zero,
                    "indirect": config.alpha * indirect if config.use_indirect else zero}
        out.diagnostics = term_balance(weighted, student_logits, tp_group, stats, selected, beyond_top1)
    return out


def term_balance(weighted_terms: dict, student_logits: torch.Tensor, tp_group, stats, selected, beyond_top1
                 ) -> dict[str, torch.Tensor]:
    """The DIAGNOSTICS (module docstring) from the weighted terms, the statistics and the entropy set I."""
    norms, shares = term_gradient_norms(weighted_terms, student_logits, tp_group)
    zero = stats.student_entropy.new_zeros(())
    if selected is None or not selected.numel():   # no targets
        h_s = h_t = agreement = zero
    else:
        h_s = stats.student_entropy.detach().index_select(0, selected).mean()
        h_t = stats.teacher_entropy.index_select(0, selected).mean()
        agreement = (stats.student_argmax == stats.teacher_argmax).index_select(0, selected).to(zero.dtype).mean()
    values = [*(norms[t] for t in TERMS), *(shares[t] for t in TERMS), h_s, h_t, agreement, beyond_top1.detach()]
    return {name: value.detach().float() for name, value in zip(DIAGNOSTICS, values)}


def teacher_mass_beyond_top1(stats, positions: torch.Tensor) -> torch.Tensor:
    """Per position, sum over the candidates but the teacher's favourite of p_T(c) = exp(z_T,c / T - log Z_T)."""
    p = torch.exp(stats.candidate_teacher.index_select(0, positions)
                  - stats.teacher_log_normalizer.index_select(0, positions).unsqueeze(1))
    return p.sum(dim=1) - p.amax(dim=1)


def entropy_gate(student_entropy: torch.Tensor, teacher_entropy: torch.Tensor, tau: float) -> torch.Tensor:
    """w_t = sigmoid((H_S - H_T) / tau), stop-gradient: large where the student is unsure and the teacher confident."""
    return torch.sigmoid((student_entropy.detach() - teacher_entropy.detach()) / tau)


def selection_size(count: int, rho: float) -> int:
    """floor(rho * N), at least 1 (a tiny epsilon keeps 0.1 * 30 from flooring to 2 through rounding)."""
    return max(1, math.floor(rho * count + 1e-9))


def top_entropy_selection(entropy: torch.Tensor, rho: float) -> torch.Tensor:
    """Indices of the top-rho fraction of positions by (detached) entropy: the paper's set I."""
    return torch.topk(entropy.detach(), selection_size(entropy.numel(), rho)).indices


def reference_entropy_selection(entropy: torch.Tensor, on_target: torch.Tensor, rho: float) -> torch.Tensor:
    """Released code: every position (pads of the response region included) with H_S >= the rho-quantile of H_S over
    the targets, i.e. about 1 - rho of them."""
    threshold = torch.quantile(entropy.detach().index_select(0, on_target), rho)
    return torch.nonzero(entropy.detach() >= threshold).view(-1)


def opener_selection(entropy: torch.Tensor, rows: torch.Tensor, fraction: float, num_rows: int,
                     width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response (row), positions 1..m with m the first where cumulative entropy / total >= c (crossing kept).

    ``entropy`` and ``rows`` list the targets in row-major order (rows < ``num_rows``, at most ``width`` targets a
    row). Returns (a boolean over them: in the opener, m per row: 0 for rows without targets). A response whose
    entropies are all 0 opens with one position. Computed on a [rows, width] layout with no host synchronisation:
    a position is kept iff the cumulative share BEFORE it is below c (cumulative sums per row, as a row's own
    cumsum gives them, since the layout's zeros add nothing).
    """
    entropy = entropy.detach()
    order = torch.arange(entropy.numel(), device=entropy.device)
    first = torch.full((num_rows,), entropy.numel(), dtype=torch.long, device=entropy.device)
    first = first.scatter_reduce(0, rows, order, reduce="amin")
    column = order - first.index_select(0, rows)                                # position within its response
    cumulative = entropy.new_zeros(num_rows, width).index_put_((rows, column), entropy).cumsum(1)
    total = cumulative[:, -1].index_select(0, rows)
    before = torch.where(column > 0, cumulative[rows, (column - 1).clamp(min=0)], 0.0)
    keep = (column == 0) | ((total > 0) & (before / total < fraction))
    lengths = torch.zeros(num_rows, dtype=entropy.dtype, device=entropy.device).index_add_(0, rows, keep.to(entropy.dtype))
    return keep, lengths


def crossing_index(entropy: torch.Tensor, fraction: float) -> int:
    """First (0-based) position where the cumulative share of the total entropy reaches ``fraction``."""
    cumulative = torch.cumsum(entropy, dim=0)
    if cumulative[-1] <= 0:
        return 0
    return int(torch.nonzero(cumulative / cumulative[-1] >= fraction)[0])


def reference_opener(entropy: torch.Tensor, on_target: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                     mask: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Released code: one length m for the micro-batch from the flattened target entropies, crossing EXCLUDED, applied
    as a column slice to every row's response region (so it may cover a short response's pads)."""
    length = crossing_index(entropy.detach().index_select(0, on_target), fraction)
    region_start = first_target_column(mask).index_select(0, rows)
    return torch.nonzero(columns - region_start < length).view(-1), length


def ranking_nll(stats, positions: torch.Tensor, compat: bool) -> torch.Tensor:
    """Plackett-Luce NLL at ``positions`` of the student's top-K candidates in the teacher's order."""
    return plackett_luce_nll(teacher_ordered(stats.candidate_student.index_select(0, positions),
                                             stats.candidate_teacher.index_select(0, positions)),
                             reference_compat=compat)


def teacher_ordered(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Student scores of the candidates re-ordered by the teacher, teacher's favourite first (ties: student order)."""
    order = torch.sort(teacher_scores, dim=-1, descending=True, stable=True).indices
    return student_scores.gather(-1, order)


def first_target_column(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column of its first target (seq length for rows without targets)."""
    is_target = mask != 0
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(is_target)
    return torch.where(is_target, columns, mask.shape[1]).amin(dim=1)


def response_region(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of every position from a row's first target to the row's end: what the reference code's
    completion slice covers (its trailing pads included)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return torch.nonzero((columns.unsqueeze(0) >= first_target_column(mask).unsqueeze(1)).reshape(-1)).view(-1)
