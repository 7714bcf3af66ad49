"""TSD-KD: gated generalized JSD + entropy regularisation + teacher re-ranking of the student's candidates."""
from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.methods.base import DistillationMethod, MethodOutput, register


@register
class TSDKD(DistillationMethod):
    name = "tsdkd"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.loss_config = TSDKDLossConfig(
            beta=c.beta, temperature=c.temperature, tau=c.tau, gamma_em=c.gamma_em, rho=c.rho, alpha=c.alpha,
            opener_fraction=c.opener_fraction, top_k=c.top_k, use_gate=c.use_gate, use_entropy=c.use_entropy,
            use_indirect=c.use_indirect, reference_compat=c.reference_compat, chunk_size=c.chunk_size)

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        out = tsdkd_loss(student_logits, teacher_logits, batch["loss_mask"], self.loss_config, tp_group=tp_group,
                         vocab_size=vocab_size)
        metrics = {"direct": out.direct, "entropy": out.entropy, "indirect": out.indirect, "gate_mean": out.gate_mean,
                   "opener_length": out.opener_length, "selected_count": out.selected_count}
        return MethodOutput(out.loss, {k: v.detach().float() if hasattr(v, "detach") else v
                                       for k, v in metrics.items()})
