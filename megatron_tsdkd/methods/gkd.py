"""GKD: generalized JSD(beta) with the on/off-policy mix (rollout.on_policy_prob), no gate."""
from megatron_tsdkd.losses import generalized_jsd_loss
from megatron_tsdkd.methods.base import DistillationMethod, MethodOutput, register


@register
class GKD(DistillationMethod):
    name = "gkd"

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        loss = generalized_jsd_loss(student_logits, teacher_logits, batch["loss_mask"], beta=self.config.beta,
                                    temperature=self.config.temperature, tp_group=tp_group, vocab_size=vocab_size,
                                    chunk_size=self.config.chunk_size)
        return MethodOutput(loss, {"jsd": loss.detach()})
