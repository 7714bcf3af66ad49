"""MiniLLM (Gu et al., ICLR 2024): reverse KL(q_S || p_T) by policy gradient on teacher-mixed samples.

Rollout (generation/co_generation.py, rule ``mixture``): y_t ~ a p_T + (1 - a) q_S, a = ``mix_alpha`` (0.2).
Loss (losses/minillm.py, where the equations are): the single-step term (1/N) sum_t w_t KL_t(q_S || p_T), exact
over the vocabulary, plus the length-normalised long-term policy gradient -(1/N) sum_t w_t R~_{t+1} log q_S(y_t),
with w_t = clip(q_S(y_t) / p~(y_t), 1 - eps, 1 + eps) detached. Included: single-step decomposition, long-term
term, teacher-mixed sampling with importance weights, length normalisation. Left out: the pretraining LM loss
L_PT (needs a separate corpus) and the PPO inner epochs (one update per rollout here).
"""
from dataclasses import dataclass

from megatron_tsdkd.checks import require, require_flags
from megatron_tsdkd.generation.co_generation import CoSampling
from megatron_tsdkd.losses.minillm import minillm_loss
from megatron_tsdkd.methods.base import (DistillationConfig, DistillationMethod, LossContext, MethodOutput, register,
                                         targets_of)


@dataclass(frozen=True)
class MiniLLMConfig(DistillationConfig):
    mix_alpha: float = 0.2              # a: the teacher's share of the sampling mixture
    weight_clip: float = 0.2            # eps: importance weights clipped to [1 - eps, 1 + eps]; 0 = no clip
    length_normalise: bool = True       # R_{t+1} as a mean over the future tokens (the paper's R^Norm)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.temperature == 1.0, "temperature", self.temperature,
                "must be 1 for minillm (the policy gradient needs the sampling policy's own log-probabilities)")
        require(0.0 <= self.mix_alpha < 1.0, "mix_alpha", self.mix_alpha, "must lie in [0, 1)")
        require(0.0 <= self.weight_clip < 1.0, "weight_clip", self.weight_clip, "must lie in [0, 1)")
        require_flags(self, "length_normalise")


@register
class MiniLLM(DistillationMethod):
    name = "minillm"
    engines = ("megatron",)
    Config = MiniLLMConfig
    co_generation = True
    needs_exact_sampling = True
    logs = ("single", "long", "reverse_kl", "weight_mean")

    def co_sampling(self) -> CoSampling:
        return CoSampling("mixture", mix_alpha=self.config.mix_alpha)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        c = self.config
        out = minillm_loss(student_logits, teacher_logits, batch.labels, batch.loss_mask, mix_alpha=c.mix_alpha,
                           weight_clip=c.weight_clip, length_normalise=c.length_normalise, tp_group=ctx.tp_group,
                           vocab_size=ctx.vocab_size, chunk_size=c.chunk_size, targets=targets_of(batch))
        return MethodOutput(out.loss, {name: getattr(out, name).detach().float() for name in self.logs})
