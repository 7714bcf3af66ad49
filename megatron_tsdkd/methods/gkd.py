"""GKD: generalized JSD(beta) with the on/off-policy mix (rollout.on_policy_prob), no gate."""
from dataclasses import dataclass

from megatron_tsdkd.checks import require
from megatron_tsdkd.losses import generalized_jsd_loss
from megatron_tsdkd.methods.base import (DistillationConfig, DistillationMethod, LossContext, MethodOutput, register,
                                         targets_of)


@dataclass(frozen=True)
class GKDConfig(DistillationConfig):
    beta: float = 0.9                   # 0 = forward KL, 1 = reverse KL

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.beta <= 1.0, "beta", self.beta, "must lie in [0, 1]")


@register
class GKD(DistillationMethod):
    name = "gkd"
    Config = GKDConfig
    logs = ("jsd",)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        loss = generalized_jsd_loss(student_logits, teacher_logits, batch.loss_mask, beta=self.config.beta,
                                    temperature=self.config.temperature, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size,
                                    chunk_size=self.config.chunk_size, targets=targets_of(batch))
        return MethodOutput(loss, {"jsd": loss.detach()})
