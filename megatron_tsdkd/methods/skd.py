"""Speculative KD (Xu et al., ICLR 2025): train on sequences the student and teacher write together.

Rollout (generation/co_generation.py, rule ``speculative``): at each step the student proposes y_t ~ q_S(. | y_<t);
the teacher keeps it when y_t is within its top-K (z_T[y_t] >= K-th largest teacher logit), otherwise replaces it by
its own draw from its top-K distribution. Loss on the resulting responses, the same token-level divergence as
supervised / on-policy KD (forward KL by default, our reading of the paper's main setting; a setting):

    L = (1 / N) sum_t mask_t D(p_T,t, p_S,t),   D = KL(p_T || p_S)         (skd_divergence = forward_kl, default)
                                                  = JSD(beta) (GKD's)      (skd_divergence = jsd, method.beta)
                                                  = KL(p_S || p_T)         (skd_divergence = reverse_kl)

K = vocabulary gives on-policy KD (student samples), K = 1 gives supervised KD on teacher-greedy outputs; the
default K = 25 is our reading of the paper's setting (checked against no released code). Off-policy micro-batches (rollout.on_policy_prob < 1) train
on the data set's responses, which is the paper's supervised-KD mixing.
"""
from dataclasses import dataclass
from typing import Literal

from megatron_tsdkd.checks import require
from megatron_tsdkd.generation.co_generation import CoSampling
from megatron_tsdkd.losses import Divergence, divergence_loss
from megatron_tsdkd.methods.base import (DistillationConfig, DistillationMethod, LossContext, MethodOutput, register,
                                         targets_of)


@dataclass(frozen=True)
class SKDConfig(DistillationConfig):
    top_k: int = 25                     # the teacher accepts a student token within its top-K
    skd_divergence: Literal["forward_kl", "jsd", "reverse_kl"] = "forward_kl"
    beta: float = 0.5                   # the JSD's mixture weight (skd_divergence = jsd only)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", self.top_k, "must be an integer >= 1")
        require(self.skd_divergence in ("forward_kl", "jsd", "reverse_kl"), "skd_divergence",
                self.skd_divergence, "must be forward_kl, jsd or reverse_kl")
        require(0.0 < self.beta < 1.0, "beta", self.beta, "must lie in (0, 1)")

    @property
    def divergence(self) -> Divergence:
        if self.skd_divergence == "jsd":
            return Divergence.generalized_jsd(self.beta)
        return Divergence(self.skd_divergence)


@register
class SpeculativeKD(DistillationMethod):
    name = "skd"
    engines = ("megatron",)
    Config = SKDConfig
    co_generation = True
    logs = ("divergence",)        # the chosen divergence (method.skd_divergence)

    def co_sampling(self) -> CoSampling:
        return CoSampling("speculative", top_k=self.config.top_k)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        loss = divergence_loss(student_logits, teacher_logits, batch.loss_mask, self.config.divergence,
                               temperature=self.config.temperature, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size,
                               chunk_size=self.config.chunk_size, targets=targets_of(batch))
        return MethodOutput(loss, {"divergence": loss.detach()})
