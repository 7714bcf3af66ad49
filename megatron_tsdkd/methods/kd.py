"""Supervised KD: forward KL(p_T || p_S) on fixed responses."""
from megatron_tsdkd.losses import forward_kl_loss
from megatron_tsdkd.methods.base import (DistillationConfig, DistillationMethod, LossContext, MethodOutput, register,
                                         targets_of)


@register
class SupervisedKD(DistillationMethod):
    name = "kd"
    Config = DistillationConfig
    on_policy = False
    logs = ("forward_kl",)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        loss = forward_kl_loss(student_logits, teacher_logits, batch.loss_mask, temperature=self.config.temperature,
                               tp_group=ctx.tp_group, vocab_size=ctx.vocab_size, chunk_size=self.config.chunk_size,
                               targets=targets_of(batch))
        return MethodOutput(loss, {"forward_kl": loss.detach()})
