"""One chunked pass over vocab-sharded logits giving, per token, a divergence, both entropies and top-K candidates.

Written by hand because no installable library fuses these under tensor parallelism with a memory-bounded backward
(megatron-core has cross-entropy only; NeMo-RL's chunked distributed log-softmax was the model to learn from).
Forward: for each chunk of tokens, upcast that chunk only, compute the global log-normalisers (all-reduce MAX, then
SUM of exp), the local partial sums of every needed expectation, one all-reduce SUM of those scalars; keep per-token
scalars only. Backward: recompute the chunk from the saved normalisers and write d(loss)/d(logits) straight into one
gradient buffer of the input's dtype. Backward needs no communication: every cross-rank term of the gradient is a
per-token scalar already all-reduced in forward.

Gradient rule used throughout: for f(log p) with log p = z - logsumexp(z), df/dz_v = g_v - p_v * sum_u g_u with
g_u = df/d(log p_u); the sum over the whole vocabulary is one of the saved scalars.
Accuracy: each KL is summed term by term, p * (log p - log m), with log p - log m taken from the log-odds of the two
mixture components (never log m itself), rather than as a difference of expectations such as sum p log p - sum p log m,
which cancels catastrophically in fp32 over 150k entries (1e-4 relative error measured; now ~1e-7, better than dense).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from megatron_tsdkd.losses.inputs import check_same_shard
from megatron_tsdkd.losses.vocab_parallel import VocabShard, all_reduce_, gather_global_ids, global_max, topk_global

KINDS = ("none", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


@dataclass(frozen=True)
class Divergence:
    """Which divergence D(p_S, p_T) to compute per token; ``weight`` is beta for jsd and the skew alpha for skews.

    forward_kl = KL(p_T || p_S); reverse_kl = KL(p_S || p_T);
    jsd = beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S, 0 < beta < 1;
    skew_kl = KL(p_T || a p_T + (1 - a) p_S); skew_reverse_kl = KL(p_S || a p_S + (1 - a) p_T), 0 < a < 1.
    """
    kind: str
    weight: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"divergence kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "jsd" and not 0.0 < self.weight < 1.0:
            raise ValueError(f"jsd beta = {self.weight} must lie in (0, 1); use forward_kl / reverse_kl for 0 / 1")
        if self.kind.startswith("skew") and not 0.0 < self.weight < 1.0:
            raise ValueError(f"skew alpha = {self.weight} must lie in (0, 1); use Divergence.skew for 0")

    @property
    def mixture_weights(self) -> tuple[float, float]:
        """(w_S, w_T) of the mixture m = w_S p_S + w_T p_T of jsd and the skews."""
        if self.kind == "skew_reverse_kl":
            return self.weight, 1.0 - self.weight
        return 1.0 - self.weight, self.weight

    @classmethod
    def skew(cls, kind: str, alpha: float) -> "Divergence":
        """DistiLLM skews; alpha = 0 is plain forward / reverse KL."""
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"skew alpha = {alpha} must lie in [0, 1)")
        if alpha == 0.0:
            return cls("forward_kl" if kind == "skew_kl" else "reverse_kl")
        return cls(kind, float(alpha))

    @classmethod
    def generalized_jsd(cls, beta: float) -> "Divergence":
        """The GKD limits are special cases, never log 0: beta = 0 is forward KL, beta = 1 reverse KL."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta = {beta} must lie in [0, 1]")
        if beta == 0.0:
            return cls("forward_kl")
        if beta == 1.0:
            return cls("reverse_kl")
        return cls("jsd", float(beta))


class TokenStatistics(NamedTuple):
    divergence: torch.Tensor         # [n], differentiable w.r.t. student logits
    student_entropy: torch.Tensor    # [n], differentiable w.r.t. student logits
    teacher_entropy: torch.Tensor    # [n], constant
    candidate_student: torch.Tensor  # [n, K] student (temperature-scaled) logits at its global top-K, differentiable
    candidate_teacher: torch.Tensor  # [n, K] teacher (temperature-scaled) logits at the same ids, constant
    candidate_ids: torch.Tensor      # [n, K] global vocabulary ids, largest student logit first
    teacher_log_normalizer: torch.Tensor  # [n] log sum_v exp(z_T,v / T), constant: p_T at a candidate is exact
    student_argmax: torch.Tensor     # [n] global id of the student's top token when ``argmax`` (else empty), constant
    teacher_argmax: torch.Tensor     # [n] global id of the teacher's top token when ``argmax`` (else empty), constant


def token_statistics(student: torch.Tensor, teacher: torch.Tensor | None, token_index: torch.Tensor,
                     divergence: Divergence, shard: VocabShard, *, temperature: float = 1.0,
                     chunk_size: int = 1024, top_k: int = 0, argmax: bool = False) -> TokenStatistics:
    """Per-token statistics at rows ``token_index`` of 2-D logits [tokens, V/TP] (see the module docstring).

    ``argmax`` adds both models' top-1 ids (one more small all-gather per chunk): for diagnostics at diagnostic steps.
    """
    if student.dim() != 2:
        raise ValueError(f"student logits must be 2-D [tokens, V/TP], got shape {tuple(student.shape)}")
    if teacher is None and divergence.kind != "none":
        raise ValueError(f"divergence {divergence.kind!r} needs teacher logits")
    if teacher is not None:
        check_same_shard(student, teacher)
    if top_k and teacher is None:
        raise ValueError("top-K candidates need teacher logits to rank them")
    if argmax and teacher is None:
        raise ValueError("argmax ids compare the two models and need teacher logits")
    return TokenStatistics(*_TokenStatisticsFunction.apply(
        student, teacher, token_index.long(), divergence, shard, float(temperature), int(chunk_size), int(top_k),
        bool(argmax)))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for low-precision logits, fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def upcast_rows(logits: torch.Tensor, rows: torch.Tensor, shard: VocabShard, dtype: torch.dtype,
                temperature: float) -> torch.Tensor:
    """A fresh ``dtype`` copy of the real columns of ``rows``, divided by the temperature (safe to modify in place)."""
    chunk = logits.index_select(0, rows)[:, : shard.real_width].to(dtype)
    return chunk.div_(temperature) if temperature != 1.0 else chunk


def _rowsum_of_product_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[:, v] * b[:, v], overwriting a (torch.sum's cascade summation keeps fp32 accurate over 150k terms)."""
    return a.mul_(b).sum(dim=1)


def _softplus_(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(x, x.new_zeros(()), out=x)


def _log_ratios_to_mixture(logp_s, logp_t, divergence: Divergence, out_s, out_t=None):
    """log p_S - log m into out_s (and log p_T - log m into out_t) for m = w_S p_S + w_T p_T, via the log-odds
    u = log(w_S p_S) - log(w_T p_T): log p_S - log m = -log w_S - softplus(-u), log p_T - log m = -log w_T - softplus(u).
    Never forms m itself, so nothing underflows to log 0 and no large terms cancel."""
    w_s, w_t = divergence.mixture_weights
    u = torch.sub(logp_s, logp_t, out=out_s).add_(math.log(w_s / w_t))
    log_ratio_t = _softplus_(out_t.copy_(u)).neg_().sub_(math.log(w_t)) if out_t is not None else None
    log_ratio_s = _softplus_(u.neg_()).neg_().sub_(math.log(w_s))
    return log_ratio_s, log_ratio_t


def _log_softmax_(z: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z -> (log p in z's storage, p, global log-normaliser): max all-reduce, then sum-exp all-reduce."""
    shift = global_max(z, shard)
    z.sub_(shift.unsqueeze(1))
    p = torch.exp(z)
    total = all_reduce_(p.sum(dim=1), shard)
    log_total = total.log()
    z.sub_(log_total.unsqueeze(1))
    p.div_(total.unsqueeze(1))
    return z, p, shift + log_total


class _TokenStatisticsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, token_index, divergence, shard, temperature, chunk_size, top_k, argmax):
        dtype = compute_dtype(student)
        n, kind, w = token_index.numel(), divergence.kind, divergence.weight
        new = lambda *shape: torch.zeros(*shape, dtype=dtype, device=student.device)  # noqa: E731
        div, h_s, h_t, lse_s, lse_t, aux = (new(n) for _ in range(6))
        cand_s, cand_t = new(n, top_k), new(n, top_k)
        cand_ids = torch.zeros(n, top_k, dtype=torch.long, device=student.device)
        top1_s, top1_t = (torch.zeros(n if argmax else 0, dtype=torch.long, device=student.device) for _ in range(2))
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            rows = token_index[lo:hi]
            z_s = upcast_rows(student, rows, shard, dtype, temperature)
            z_t = upcast_rows(teacher, rows, shard, dtype, temperature) if teacher is not None else None
            if top_k:
                cand_s[lo:hi], cand_ids[lo:hi] = topk_global(z_s, top_k, shard)
                cand_t[lo:hi] = gather_global_ids(z_t, cand_ids[lo:hi], shard)
            if argmax:
                top1_t[lo:hi] = topk_global(z_t, 1, shard)[1][:, 0]
                top1_s[lo:hi] = cand_ids[lo:hi, 0] if top_k else topk_global(z_s, 1, shard)[1][:, 0]
            logp_s, p_s, lse_s[lo:hi] = _log_softmax_(z_s, shard)
            scratch = torch.mul(logp_s, p_s)
            partial = [scratch.sum(dim=1)]                                        # sum p_S log p_S
            if z_t is not None:
                logp_t, p_t, lse_t[lo:hi] = _log_softmax_(z_t, shard)
                partial.append(torch.mul(logp_t, p_t, out=scratch).sum(dim=1))  # sum p_T log p_T
            if kind == "forward_kl":
                partial.append(_rowsum_of_product_(torch.sub(logp_t, logp_s, out=scratch), p_t))
            elif kind == "reverse_kl":
                partial.append(_rowsum_of_product_(torch.sub(logp_s, logp_t, out=scratch), p_s))
            elif kind != "none":
                ratio_s, ratio_t = _log_ratios_to_mixture(logp_s, logp_t, divergence, out_s=scratch, out_t=logp_t)
                if kind == "skew_kl":       # KL(p_T || m); sum p_T p_S / m
                    partial += [_rowsum_of_product_(ratio_t, p_t), _rowsum_of_product_(ratio_s.exp_(), p_t)]
                elif kind == "skew_reverse_kl":  # KL(p_S || m); sum p_S p_S / m
                    kl = torch.mul(ratio_s, p_s, out=logp_s).sum(dim=1)
                    partial += [kl, _rowsum_of_product_(ratio_s.exp_(), p_s)]
                else:                       # jsd: KL(p_S || m), KL(p_T || m)
                    partial += [_rowsum_of_product_(ratio_s, p_s), _rowsum_of_product_(ratio_t, p_t)]
            del scratch
            sums = all_reduce_(torch.stack(partial, dim=1), shard)
            h_s[lo:hi] = -sums[:, 0]
            if z_t is not None:
                h_t[lo:hi] = -sums[:, 1]
            if kind in ("forward_kl", "skew_kl"):
                div[lo:hi] = sums[:, 2]
            elif kind == "reverse_kl":
                div[lo:hi] = aux[lo:hi] = sums[:, 2]
            if kind == "skew_kl":
                aux[lo:hi] = -(1 - w) * sums[:, 3]                  # sum_v dD/dlog p_S,v
            elif kind == "skew_reverse_kl":
                div[lo:hi] = sums[:, 2]
                aux[lo:hi] = sums[:, 2] + 1 - w * sums[:, 3]        # sum_v dD/dlog p_S,v
            elif kind == "jsd":
                div[lo:hi] = (1 - w) * sums[:, 2] + w * sums[:, 3]
                aux[lo:hi] = sums[:, 2]                             # KL(p_S || m)
        ctx.save_for_backward(student, teacher, token_index, lse_s, lse_t, h_s, aux, cand_ids)
        ctx.divergence, ctx.shard, ctx.temperature, ctx.chunk_size = divergence, shard, temperature, chunk_size
        ctx.mark_non_differentiable(h_t, cand_t, cand_ids, lse_t, top1_s, top1_t)
        # An output the loss does not use gets None, not zeros: a backward of one term alone (the per-term gradient
        # norms of the diagnostics and of the term balance) then skips the others' vocabulary work
        ctx.set_materialize_grads(False)
        return div, h_s, h_t, cand_s, cand_t, cand_ids, lse_t, top1_s, top1_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div, grad_h_s, _grad_h_t, grad_cand_s, _grad_cand_t, _grad_ids, *_constants):
        student, teacher, token_index, lse_s, lse_t, h_s, aux, cand_ids = ctx.saved_tensors
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk_size
        kind, w = ctx.divergence.kind, ctx.divergence.weight
        dtype = compute_dtype(student)
        grad_student = torch.zeros_like(student)
        if kind == "none":
            grad_div = None
        if grad_cand_s is not None and not grad_cand_s.shape[1]:
            grad_cand_s = None
        if grad_div is None and grad_h_s is None and grad_cand_s is None:
            return (None,) * 9
        for lo in range(0, token_index.numel(), chunk):
            hi = min(token_index.numel(), lo + chunk)
            rows = token_index[lo:hi]
            if grad_div is None and grad_h_s is None:   # the candidates' gradient alone: no vocabulary pass
                grad = torch.zeros(hi - lo, shard.real_width, dtype=dtype, device=student.device)
            else:
                logp_s = upcast_rows(student, rows, shard, dtype, temperature).sub_(lse_s[lo:hi].unsqueeze(1))
                p_s = torch.exp(logp_s)
                grad = torch.zeros_like(p_s)
            if grad_div is not None:
                c_div = grad_div[lo:hi].unsqueeze(1)
                logp_t = upcast_rows(teacher, rows, shard, dtype, temperature).sub_(lse_t[lo:hi].unsqueeze(1))
                a = aux[lo:hi].unsqueeze(1)
                if kind == "forward_kl":      # dD/dz = p_S - p_T
                    grad = torch.sub(p_s, logp_t.exp_(), out=grad)
                elif kind == "reverse_kl":    # dD/dz = p_S (log p_S - log p_T - D)
                    grad = torch.sub(logp_s, logp_t, out=grad).sub_(a).mul_(p_s)
                elif kind == "jsd":           # dD/dz = (1 - beta) p_S (log p_S - log m - KL(p_S || m))
                    grad = _log_ratios_to_mixture(logp_s, logp_t, ctx.divergence, out_s=grad)[0]
                    grad.sub_(a).mul_(p_s).mul_(1 - w)
                elif kind == "skew_kl":       # g = -(1 - a) p_T p_S / m;  dD/dz = g - p_S sum(g)
                    grad = _log_ratios_to_mixture(logp_s, logp_t, ctx.divergence, out_s=grad)[0]
                    grad.exp_().mul_(logp_t.exp_()).mul_(-(1 - w)).addcmul_(p_s, a, value=-1.0)
                elif kind == "skew_reverse_kl":  # g = p_S (log p_S - log m + 1 - a p_S / m); dD/dz = g - p_S sum(g)
                    grad = _log_ratios_to_mixture(logp_s, logp_t, ctx.divergence, out_s=grad)[0]
                    ratio = torch.exp(grad, out=logp_t)
                    grad.add_(1).sub_(a).add_(ratio, alpha=-w).mul_(p_s)
                grad.mul_(c_div)
            if grad_h_s is not None:          # dH_S/dz = -p_S (log p_S + H_S)
                entropy_grad = logp_s.add_(h_s[lo:hi].unsqueeze(1)).mul_(p_s).mul_(grad_h_s[lo:hi].unsqueeze(1))
                grad.sub_(entropy_grad)
            if grad_cand_s is not None and grad_cand_s.shape[1] and grad.shape[1]:
                local_ids = cand_ids[lo:hi] - shard.start
                owned = (local_ids >= 0) & (local_ids < shard.real_width)
                grad.scatter_add_(1, torch.where(owned, local_ids, 0),
                                  torch.where(owned, grad_cand_s[lo:hi], 0).to(grad.dtype))
            if temperature != 1.0:
                grad.div_(temperature)
            grad_student[rows, : shard.real_width] = grad.to(grad_student.dtype)
        return grad_student, None, None, None, None, None, None, None, None
