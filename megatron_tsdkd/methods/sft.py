"""SFT / Seq-KD: cross-entropy on the data set's responses (gold, or teacher-generated for Seq-KD)."""
from megatron_tsdkd.losses import cross_entropy_loss
from megatron_tsdkd.methods.base import (DistillationMethod, LossContext, MethodConfig, MethodOutput, register,
                                         targets_of)


@register
class SFT(DistillationMethod):
    name = "sft"
    Config = MethodConfig
    needs_teacher = False
    on_policy = False
    logs = ("ce",)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        loss = cross_entropy_loss(student_logits, batch.labels, batch.loss_mask, tp_group=ctx.tp_group,
                                  vocab_size=ctx.vocab_size, chunk_size=self.config.chunk_size, targets=targets_of(batch))
        return MethodOutput(loss, {"ce": loss.detach()})
