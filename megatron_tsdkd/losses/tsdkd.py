"""The TSD-KD loss (docs/METHOD.md): gated generalized JSD + entropy regularisation + teacher re-ranking.

    L = L_direct + gamma_em * L_em + alpha * L_indirect

Written by hand (no library implements it; the released reference is a TRL subclass on dense logits). One chunked
pass over the vocab-sharded logits (token_statistics) yields per token the JSD, both entropies and the student's
top-K candidates with the teacher's logits at them; everything below works on those per-token scalars, so no
[tokens, V] tensor is ever materialised in fp32. Selections (gate, entropy set, opener, candidates, ranking) are
detached. ``reference_compat`` switches to the released code's rules (METHOD.md section 6,
losses/reference_compat.py) on the micro-batch's completion block; pad == eos masking belongs to the data
pipeline, not to the loss.
``balance`` (method.balance=shares, docs/METHOD.md section 7) multiplies the three weighted terms by weights it
derives from their logit-gradient norms (losses/term_balance.py); the diagnostics then describe the applied terms.

Diagnostics (``diagnose=True``, at diagnostic steps only; detached fp32 scalars named as TensorBoard shows them):
- grad_norm/<term>, grad_share/<term> for term in direct, entropy, indirect: the norm of d(term)/d(student logits)
  of the weighted terms L_direct, gamma_em * L_em, alpha * L_indirect (times the balance weights when balancing),
  and norm / sum of the three norms (losses/term_gradients.py; 0 for a switched-off term);
- select/student_entropy, select/teacher_entropy: mean H_S, H_T over the entropy set I (computed for the
  diagnostics even when use_entropy is off); select/top1_agreement: the fraction of I where
  argmax p_S = argmax p_T;
- rerank/teacher_mass_beyond_top1: mean over opener positions of sum_{j=2..K} p_T(c_j), the teacher's
  probability (at temperature T) of the candidates it ranks below its favourite (0 when use_indirect is off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_tsdkd.losses.config import TSDKDLossConfig
from megatron_tsdkd.losses import reference_compat
from megatron_tsdkd.losses.inputs import Targets, check_same_shard, flatten_logits, positions_of, token_mean
from megatron_tsdkd.losses.plackett_luce import plackett_luce_nll
from megatron_tsdkd.losses.reference_compat import completion_block
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
    term_weights: torch.Tensor | None = None   # [3] balance weights of direct, entropy, indirect (ones: no balance)


TERMS = ("direct", "entropy", "indirect")
DIAGNOSTICS = (*(f"grad_norm/{t}" for t in TERMS), *(f"grad_share/{t}" for t in TERMS), "select/student_entropy",
               "select/teacher_entropy", "select/top1_agreement", "rerank/teacher_mass_beyond_top1")


def tsdkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               config: TSDKDLossConfig = TSDKDLossConfig(), tp_group=None, vocab_size: int | None = None,
               diagnose: bool = False, completion_start: torch.Tensor | None = None,
               balance: Callable[[torch.Tensor], torch.Tensor] | None = None,
               targets: Targets | None = None) -> TSDKDLossOutput:
    """TSD-KD over logits [batch, seq, V/TP] (logits[b, t] scores the target at t; mask[b, t] != 0 marks targets).

    ``diagnose`` also fills ``diagnostics`` (module docstring): one extra backward per term, so diagnostic steps only.
    ``completion_start`` (reference_compat only): per row, the column where its completion starts (prompt length
    - 1 in our collation); the released rules work on that completion block (losses/reference_compat.py). None:
    the logits ARE the completion block (the released code's own tensors).
    ``balance`` (``balance: shares``): called once with the three weighted terms' logit-gradient norms [3]
    (TP-reduced; None when the logits need no gradient), returns the detached weights [3] that multiply them in
    the total (losses/term_balance.py); the diagnostics then report the weighted terms.
    ``targets``: the batch's host-side ``Targets`` (losses/inputs.py); None reads them off ``mask``.
    """
    student = flatten_logits("student", student_logits, mask)
    teacher = flatten_logits("teacher", teacher_logits, mask)
    check_same_shard(student, teacher)
    shard = VocabShard.of(student, tp_group, vocab_size)
    if config.use_indirect and config.top_k > shard.vocab_size:
        raise ValueError(f"TSDKDLossConfig.top_k = {config.top_k} exceeds the real vocabulary size {shard.vocab_size}")
    if config.reference_compat:
        return _reference_tsdkd_loss(student, teacher, student_logits, mask, config, shard, tp_group, diagnose,
                                     completion_start, balance)
    positions = positions_of(mask, targets)
    stats = token_statistics(student, teacher, positions, Divergence.generalized_jsd(config.beta), shard,
                             temperature=config.temperature, chunk_size=config.chunk_size,
                             top_k=config.top_k if config.use_indirect else 0, argmax=diagnose)
    terms = _gated_direct(stats, config)
    count = positions.numel()
    if (config.use_entropy or diagnose) and count:
        terms.set_entropy(top_entropy_selection(stats.student_entropy, config.rho), config)
    if config.use_indirect and count:
        # every target ranked, the opener's kept by a mask: no data-dependent gather, no host sync
        rows = positions // mask.shape[1]
        keep, lengths = opener_selection(stats.student_entropy, rows, config.opener_fraction, *mask.shape)
        terms.opener_length = lengths.sum() / (lengths > 0).sum()
        terms.indirect = torch.where(keep, ranking_nll(stats, compat=False), 0.0).sum() / keep.sum()
        if diagnose:
            terms.beyond_top1 = torch.where(keep, teacher_mass_beyond_top1(stats), 0.0).sum() / keep.sum()
    return _combine(config, terms, student_logits, tp_group, diagnose, balance)


def _reference_tsdkd_loss(student, teacher, student_logits, mask, config, shard, tp_group, diagnose,
                          completion_start, balance) -> TSDKDLossOutput:
    """The released code's loss (losses/reference_compat.py) on the micro-batch's completion block: the same terms
    as ``tsdkd_loss``, over the block's targets, with the released selection rules."""
    block = completion_block(mask, completion_start)
    stats = token_statistics(student, teacher, block.positions, Divergence.generalized_jsd(config.beta), shard,
                             temperature=config.temperature, chunk_size=config.chunk_size,
                             top_k=config.top_k if config.use_indirect else 0, argmax=diagnose)
    on_target = block.inverse[block.target]              # into the statistics, row-major
    terms = _gated_direct(stats, config, on_target)
    count = on_target.numel()
    if (config.use_entropy or diagnose) and count:
        terms.set_entropy(reference_compat.entropy_selection(stats.student_entropy, block, config.rho), config)
    if config.use_indirect and count:
        length = reference_compat.opener_length(stats.student_entropy.index_select(0, on_target),
                                                config.opener_fraction)
        opener = reference_compat.opener_targets(block, length)
        terms.opener_length = terms.zero + length
        if opener.numel():
            terms.indirect = ranking_nll(stats, opener, compat=True).sum() / opener.numel()
            if diagnose:
                terms.beyond_top1 = teacher_mass_beyond_top1(stats, opener).mean()
    return _combine(config, terms, student_logits, tp_group, diagnose, balance)


@dataclass
class _Terms:
    """One micro-batch's TSD-KD terms before weighting, and what the diagnostics read (both paths fill it)."""
    stats: object
    direct: torch.Tensor
    gate_mean: torch.Tensor
    zero: torch.Tensor
    entropy: torch.Tensor = None
    selected: Optional[torch.Tensor] = None   # the entropy set I (indices into ``stats``)
    selected_count: int = 0
    indirect: torch.Tensor = None
    opener_length: torch.Tensor = None
    beyond_top1: torch.Tensor = None

    def __post_init__(self):
        for name in ("entropy", "indirect", "opener_length", "beyond_top1"):
            if getattr(self, name) is None:
                setattr(self, name, self.zero)

    def set_entropy(self, selected: torch.Tensor, config: TSDKDLossConfig) -> None:
        """The entropy set I; the entropy term (its mean student entropy) when the term is on."""
        self.selected = selected
        if config.use_entropy:
            self.entropy = self.stats.student_entropy.index_select(0, selected).mean()
            self.selected_count = selected.numel()


def _gated_direct(stats, config: TSDKDLossConfig, on: Optional[torch.Tensor] = None) -> _Terms:
    """The gated JSD (the direct term) and the gate's mean over the targets (``on``: their indices into ``stats``,
    None for all of them)."""
    h_s, h_t = stats.student_entropy, stats.teacher_entropy
    zero = h_s.new_zeros(())
    gate = entropy_gate(h_s, h_t, config.tau) if config.use_gate else torch.ones_like(h_t)
    divergence = stats.divergence
    if on is not None:
        gate, divergence = gate.index_select(0, on), divergence.index_select(0, on)
    count = gate.numel()
    return _Terms(stats, token_mean(gate * divergence, count), token_mean(gate, count) if count else zero + 1.0,
                  zero)


def _combine(config, terms: _Terms, student_logits, tp_group, diagnose, balance) -> TSDKDLossOutput:
    """The total of the switched-on weighted terms (times the balance weights when balancing), the output, and the
    diagnostics when asked."""
    direct, zero = terms.direct, terms.zero
    weighted = {"direct": direct, "entropy": config.gamma_em * terms.entropy if config.use_entropy else zero,
                "indirect": config.alpha * terms.indirect if config.use_indirect else zero}
    norms = None
    weights = torch.ones(len(TERMS), dtype=direct.dtype, device=direct.device)
    if balance is not None:
        if student_logits.requires_grad:
            norms, _ = term_gradient_norms(weighted, student_logits, tp_group)
            weights = balance(torch.stack([norms[t] for t in TERMS]))
        else:
            weights = balance(None)
        weights = weights.to(device=direct.device, dtype=direct.dtype)
    loss = weights[0] * direct if balance is not None else direct
    if config.use_entropy:
        loss = loss + weights[1] * weighted["entropy"]
    if config.use_indirect:
        loss = loss + weights[2] * weighted["indirect"]
    out = TSDKDLossOutput(loss, direct, terms.entropy, terms.indirect, terms.gate_mean.detach(),
                          terms.opener_length.detach(), zero + terms.selected_count, term_weights=weights.detach())
    if diagnose:
        if norms is not None:   # the applied terms' norms: the balance weights are constants, no extra backward
            norms = {t: weights[i].detach() * norms[t] for i, t in enumerate(TERMS)}
        out.diagnostics = term_balance(weighted, student_logits, tp_group, terms.stats, terms.selected,
                                       terms.beyond_top1, norms)
    return out


def term_balance(weighted_terms: dict, student_logits: torch.Tensor, tp_group, stats, selected, beyond_top1,
                 norms: dict | None = None) -> dict[str, torch.Tensor]:
    """The DIAGNOSTICS (module docstring) from the weighted terms (or their already measured ``norms``), the
    statistics and the entropy set I."""
    if norms is None:
        norms, shares = term_gradient_norms(weighted_terms, student_logits, tp_group)
    else:
        total = sum(norms.values())
        shares = {t: torch.where(total > 0, n / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
                  for t, n in norms.items()}
    zero = stats.student_entropy.new_zeros(())
    if selected is None or not selected.numel():   # no targets
        h_s = h_t = agreement = zero
    else:
        h_s = stats.student_entropy.detach().index_select(0, selected).mean()
        h_t = stats.teacher_entropy.index_select(0, selected).mean()
        agreement = (stats.student_argmax == stats.teacher_argmax).index_select(0, selected).to(zero.dtype).mean()
    values = [*(norms[t] for t in TERMS), *(shares[t] for t in TERMS), h_s, h_t, agreement, beyond_top1.detach()]
    return {name: value.detach().float() for name, value in zip(DIAGNOSTICS, values)}


def teacher_mass_beyond_top1(stats, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per position (every one of ``stats`` when None), sum over the candidates but the teacher's favourite of
    p_T(c) = exp(z_T,c / T - log Z_T)."""
    teacher, log_z = stats.candidate_teacher, stats.teacher_log_normalizer
    if positions is not None:
        teacher, log_z = teacher.index_select(0, positions), log_z.index_select(0, positions)
    p = torch.exp(teacher - log_z.unsqueeze(1))
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


def ranking_nll(stats, positions: torch.Tensor | None = None, *, compat: bool) -> torch.Tensor:
    """Plackett-Luce NLL at ``positions`` (every one of ``stats`` when None) of the student's top-K candidates in
    the teacher's order."""
    student, teacher = stats.candidate_student, stats.candidate_teacher
    if positions is not None:
        student, teacher = student.index_select(0, positions), teacher.index_select(0, positions)
    return plackett_luce_nll(teacher_ordered(student, teacher), reference_compat=compat)


def teacher_ordered(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Student scores of the candidates re-ordered by the teacher, teacher's favourite first (ties: student order)."""
    order = torch.sort(teacher_scores, dim=-1, descending=True, stable=True).indices
    return student_scores.gather(-1, order)
