"""Supervised KD: forward KL(p_T || p_S) on fixed responses."""
from megatron_tsdkd.losses import forward_kl_loss
from megatron_tsdkd.methods.base import DistillationConfig, DistillationMethod, MethodOutput, register, targets_of


@register
class SupervisedKD(DistillationMethod):
    name = "kd"
    Config = DistillationConfig
    on_policy = False
    logs = ("forward_kl",)

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        loss = forward_kl_loss(student_logits, teacher_logits, batch.loss_mask, temperature=self.config.temperature,
                               tp_group=tp_group, vocab_size=vocab_size, chunk_size=self.config.chunk_size,
                               targets=targets_of(batch))
        return MethodOutput(loss, {"forward_kl": loss.detach()})
