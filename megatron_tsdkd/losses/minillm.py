"""MiniLLM (Gu et al., ICLR 2024): reverse KL(q_S || p_T) over whole responses, minimised by policy gradient on
samples y drawn from the teacher-mixed policy p~ = a p_T + (1 - a) q_S (generation/co_generation.py).

Sequence objective and its gradient (the paper's Eq. 2-3, with r_t = log p_T(y_t | y_<t) - log q_S(y_t | y_<t)):

    L = KL(q_S || p_T) = - E_{y ~ q_S} sum_t r_t,     R_{t+1} = sum_{t' > t} r_{t'}                (detached)

Single-step decomposition: the expectation over y_t of the step's own reward is computed EXACTLY over the
vocabulary, E_{y_t ~ q_S}[r_t] = -KL_t(q_S(. | y_<t) || p_T(. | y_<t)), and differentiated directly; only the
future return stays a sampled policy-gradient term:

    grad L = sum_t w_t grad KL_t  -  sum_t w_t R~_{t+1} grad log q_S(y_t | y_<t)
                 (single)                    (long)

Length normalisation (the paper's R^Norm): R~_{t+1} = R_{t+1} / (number of future tokens, T - t), 0 at the last
token; the paper writes the divisor as T - t - 1, which is zero at t = T - 1 while the sum still has one term,
so the mean over the future tokens is used (``length_normalise=False`` keeps the raw sum).
Teacher-mixed sampling: the samples come from p~, so each term carries the per-token importance weight
w_t = q_S(y_t | y_<t) / p~(y_t | y_<t) (the paper's per-token approximation of the product over the prefix),
detached and clipped to [1 - eps, 1 + eps] (``weight_clip`` eps = 0.2; eps = 0 switches clipping off). The
paper's released trainer multiplies w_t into its PPO ratio and clips that product at the PPO cliprange 0.2 (a
pessimistic min of clipped and unclipped objectives); this trainer makes one update per rollout and has no PPO
ratio, so the weight itself is clipped, the plain reading of that clip rather than a copy of PPO's. Note that
w_t <= 1 / (1 - a) always (1.25 at a = 0.2). With a = 0, w_t = 1 and this is plain on-policy reverse KL.

The loss returned is the surrogate whose gradient is the expression above, as a token mean over the micro-batch's
N response tokens: L = (1 / N) sum_t w_t [KL_t - R~_{t+1} log q_S(y_t)]. Out of scope: the paper's pretraining
language-model loss L_PT (a separate corpus), its PPO inner epochs and its reward scaling / whitening.

Vocab-parallel: KL_t comes from token_statistics (chunked, one all-reduce per chunk, exact gradient);
log q_S(y_t) from the chunked vocab-parallel cross-entropy (the sampled token's logit from its owning rank);
log p_T(y_t) from gather_global_ids and the teacher's log-normaliser. p_T(y_t) and q_S(y_t) are recomputed from the
training-time logits, so the rollout only has to hand over the tokens. Assumes the rollout sampled at
temperature 1 without top-k / top-p (otherwise p~ at training time is not the sampling law).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from megatron_tsdkd.losses.cross_entropy import _CrossEntropyFunction
from megatron_tsdkd.losses.inputs import Targets, check_same_shard, flatten_logits, positions_of, token_mean
from megatron_tsdkd.losses.token_statistics import Divergence, token_statistics
from megatron_tsdkd.losses.vocab_parallel import VocabShard, gather_global_ids


class MiniLLMLossOutput(NamedTuple):
    loss: torch.Tensor          # single + long, the surrogate to back-propagate
    single: torch.Tensor        # (1 / N) sum_t w_t KL_t (differentiable)
    long: torch.Tensor          # (1 / N) sum_t -w_t R~_{t+1} log q_S(y_t) (differentiable surrogate)
    reverse_kl: torch.Tensor    # (1 / N) sum_t KL_t, unweighted (detached): the quantity being minimised per step
    weight_mean: torch.Tensor   # mean clipped importance weight (detached); 1 when a = 0


def future_mean(values: torch.Tensor, mask: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Per position t of [batch, seq] ``values`` (0 off ``mask``): sum_{t' > t, mask} values_t', divided by the
    number of those positions when ``normalise`` (0 where there is none)."""
    def after(x):  # sum over the positions strictly after t in the row
        return x.flip(-1).cumsum(-1).flip(-1) - x
    total = after(values)
    if not normalise:
        return total
    count = after(mask)
    return total / count.clamp(min=1)


def minillm_loss(student_logits, teacher_logits, labels, mask, *, mix_alpha: float = 0.2, weight_clip: float = 0.2,
                 length_normalise: bool = True, tp_group=None, vocab_size: int | None = None,
                 chunk_size: int = 1024, targets: Targets | None = None) -> MiniLLMLossOutput:
    """The MiniLLM surrogate (module docstring) on vocab-sharded logits [batch, seq, V/TP]; ``labels`` [batch, seq]
    are the sampled tokens y_t scored at t, ``mask`` [batch, seq] marks the response targets (one response per row);
    ``targets``: the batch's host-side ``Targets`` (losses/inputs.py), None reads them off ``mask``."""
    if not 0.0 <= mix_alpha < 1.0:
        raise ValueError(f"mix_alpha = {mix_alpha} must lie in [0, 1)")
    if not 0.0 <= weight_clip < 1.0:
        raise ValueError(f"weight_clip = {weight_clip} must lie in [0, 1)")
    student = flatten_logits("student", student_logits, mask)
    teacher = flatten_logits("teacher", teacher_logits, mask)
    check_same_shard(student, teacher)
    if tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match mask shape {tuple(mask.shape)}")
    shard = VocabShard.of(student, tp_group, vocab_size)
    targets = positions_of(mask, targets)
    n = targets.numel()
    target_labels = labels.reshape(-1).index_select(0, targets).long()

    stats = token_statistics(student, teacher, targets, Divergence("reverse_kl"), shard, chunk_size=chunk_size)
    reverse_kl = stats.divergence                                        # [n] KL_t(q_S || p_T), differentiable
    student_logq = -_CrossEntropyFunction.apply(student, targets, target_labels, shard, int(chunk_size))
    with torch.no_grad():
        safe_labels = labels.reshape(-1, 1).long()      # every row: a [tokens, 1] gather, no copy of the shard
        teacher_at_label = gather_global_ids(teacher, safe_labels, shard).squeeze(1).index_select(0, targets)
        teacher_logp = teacher_at_label.to(stats.teacher_log_normalizer.dtype) - stats.teacher_log_normalizer
        logq = student_logq.detach()
        if mix_alpha > 0.0:   # w = q / (a p + (1 - a) q), in log space
            log_mix = torch.logaddexp(teacher_logp + math.log(mix_alpha), logq + math.log1p(-mix_alpha))
            weight = torch.exp(logq - log_mix)
        else:
            weight = torch.ones_like(logq)
        if weight_clip > 0.0:
            weight = weight.clamp(1.0 - weight_clip, 1.0 + weight_clip)
        dense_reward = torch.zeros(mask.numel(), dtype=logq.dtype, device=logq.device)
        dense_reward[targets] = teacher_logp - logq                      # r_t
        on = (mask.reshape(-1) != 0).to(logq.dtype)
        future = future_mean(dense_reward.view(mask.shape), on.view(mask.shape), length_normalise)
        future = future.reshape(-1).index_select(0, targets)            # R~_{t+1}
    single = token_mean(weight * reverse_kl, n)
    long = token_mean(-(weight * future) * student_logq, n)
    return MiniLLMLossOutput(single + long, single, long, token_mean(reverse_kl.detach(), n),
                             token_mean(weight, n))
