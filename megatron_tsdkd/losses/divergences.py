"""Token-mean distillation divergences over vocab-sharded logits: generalized JSD (GKD), KLs, DistiLLM skew KLs.

All share one convention: logits[b, t] scores the target at position t, mask[b, t] != 0 marks response targets,
the result is the mean over those targets in fp32, only the student receives gradients.
"""
from __future__ import annotations

import torch

from megatron_tsdkd.losses.inputs import Targets, check_same_shard, flatten_logits, positions_of, token_mean
from megatron_tsdkd.losses.token_statistics import Divergence, token_statistics
from megatron_tsdkd.losses.vocab_parallel import VocabShard

DEFAULT_CHUNK = 1024


def divergence_loss(student_logits, teacher_logits, mask, divergence: Divergence, *, temperature: float = 1.0,
                    tp_group=None, vocab_size: int | None = None, chunk_size: int = DEFAULT_CHUNK,
                    targets: Targets | None = None) -> torch.Tensor:
    """(1 / N) sum_t mask_t D(p_S,t, p_T,t) for any ``Divergence``. ``targets``: the batch's host-side ``Targets``
    (losses/inputs.py); None reads them off ``mask``."""
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature} must be > 0")
    student = flatten_logits("student", student_logits, mask)
    teacher = flatten_logits("teacher", teacher_logits, mask)
    check_same_shard(student, teacher)
    shard = VocabShard.of(student, tp_group, vocab_size)
    targets = positions_of(mask, targets)
    stats = token_statistics(student, teacher, targets, divergence, shard, temperature=temperature,
                             chunk_size=chunk_size)
    return token_mean(stats.divergence, targets.numel())


def generalized_jsd_loss(student_logits, teacher_logits, mask, beta: float = 0.9, temperature: float = 1.0,
                         tp_group=None, vocab_size=None, chunk_size: int = DEFAULT_CHUNK,
                         targets: Targets | None = None) -> torch.Tensor:
    """GKD's generalized JSD(beta): beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S."""
    return divergence_loss(student_logits, teacher_logits, mask, Divergence.generalized_jsd(beta),
                           temperature=temperature, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size,
                           targets=targets)


def forward_kl_loss(student_logits, teacher_logits, mask, temperature: float = 1.0, tp_group=None,
                    vocab_size=None, chunk_size: int = DEFAULT_CHUNK, targets: Targets | None = None) -> torch.Tensor:
    """KL(p_T || p_S): supervised KD."""
    return divergence_loss(student_logits, teacher_logits, mask, Divergence("forward_kl"), temperature=temperature,
                           tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size, targets=targets)


def reverse_kl_loss(student_logits, teacher_logits, mask, temperature: float = 1.0, tp_group=None,
                    vocab_size=None, chunk_size: int = DEFAULT_CHUNK, targets: Targets | None = None) -> torch.Tensor:
    """KL(p_S || p_T)."""
    return divergence_loss(student_logits, teacher_logits, mask, Divergence("reverse_kl"), temperature=temperature,
                           tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size, targets=targets)


def skew_kl_loss(student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0,
                 tp_group=None, vocab_size=None, chunk_size: int = DEFAULT_CHUNK,
                 targets: Targets | None = None) -> torch.Tensor:
    """DistiLLM skew KL: KL(p_T || alpha p_T + (1 - alpha) p_S)."""
    return divergence_loss(student_logits, teacher_logits, mask, Divergence.skew("skew_kl", alpha),
                           temperature=temperature, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size,
                           targets=targets)


def skew_reverse_kl_loss(student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0,
                         tp_group=None, vocab_size=None, chunk_size: int = DEFAULT_CHUNK,
                         targets: Targets | None = None) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(p_S || alpha p_S + (1 - alpha) p_T)."""
    return divergence_loss(student_logits, teacher_logits, mask, Divergence.skew("skew_reverse_kl", alpha),
                           temperature=temperature, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size,
                           targets=targets)


def token_entropy(logits, mask, temperature: float = 1.0, tp_group=None, vocab_size=None,
                  chunk_size: int = DEFAULT_CHUNK, targets: Targets | None = None) -> torch.Tensor:
    """Differentiable entropy of softmax(logits / T) at every target position, in row-major order ([N])."""
    flat = flatten_logits("student", logits, mask)
    shard = VocabShard.of(flat, tp_group, vocab_size)
    stats = token_statistics(flat, None, positions_of(mask, targets), Divergence("none"), shard,
                             temperature=temperature, chunk_size=chunk_size)
    return stats.student_entropy
