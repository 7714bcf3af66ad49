"""DistiLLM: skew KL, KL(p_T || a p_T + (1-a) p_S), or skew reverse KL, KL(p_S || a p_S + (1-a) p_T)."""
from megatron_tsdkd.losses import skew_kl_loss, skew_reverse_kl_loss
from megatron_tsdkd.methods.base import DistillationMethod, MethodOutput, register


@register
class DistiLLM(DistillationMethod):
    name = "distillm"

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        fn = skew_kl_loss if self.config.distillm_divergence == "skew_kl" else skew_reverse_kl_loss
        loss = fn(student_logits, teacher_logits, batch["loss_mask"], alpha=self.config.skew_alpha,
                  temperature=self.config.temperature, tp_group=tp_group, vocab_size=vocab_size,
                  chunk_size=self.config.chunk_size)
        return MethodOutput(loss, {self.config.distillm_divergence: loss.detach()})
