"""DistiLLM: skew KL, KL(p_T || a p_T + (1-a) p_S), or skew reverse KL, KL(p_S || a p_S + (1-a) p_T)."""
from dataclasses import dataclass
from typing import Literal

from megatron_tsdkd.checks import require
from megatron_tsdkd.losses import skew_kl_loss, skew_reverse_kl_loss
from megatron_tsdkd.methods.base import (DistillationConfig, DistillationMethod, LossContext, MethodOutput, register,
                                         targets_of)

DIVERGENCES = {"skew_kl": skew_kl_loss, "skew_rkl": skew_reverse_kl_loss}


@dataclass(frozen=True)
class DistiLLMConfig(DistillationConfig):
    skew_alpha: float = 0.1             # a: the skew towards the other model
    distillm_divergence: Literal["skew_kl", "skew_rkl"] = "skew_kl"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.skew_alpha < 1.0, "skew_alpha", self.skew_alpha, "must lie in [0, 1)")


@register
class DistiLLM(DistillationMethod):
    name = "distillm"
    Config = DistiLLMConfig
    logs = ("divergence",)        # the chosen skew divergence (method.distillm_divergence)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        fn = DIVERGENCES[self.config.distillm_divergence]
        loss = fn(student_logits, teacher_logits, batch.loss_mask, alpha=self.config.skew_alpha,
                  temperature=self.config.temperature, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size,
                  chunk_size=self.config.chunk_size, targets=targets_of(batch))
        return MethodOutput(loss, {"divergence": loss.detach()})
