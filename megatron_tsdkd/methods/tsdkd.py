"""TSD-KD: gated generalized JSD + entropy regularisation + teacher re-ranking of the student's candidates."""
from dataclasses import dataclass

from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.methods.base import DistillationMethod, MethodConfig, MethodOutput, register


@dataclass(frozen=True)
class TSDKDConfig(TSDKDLossConfig, MethodConfig):
    """The loss library's settings (validated there) plus the method's name: one type, one set of checks."""


@register
class TSDKD(DistillationMethod):
    name = "tsdkd"
    Config = TSDKDConfig
    logs = ("direct", "entropy", "indirect", "gate_mean", "opener_length", "selected_count")

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        out = tsdkd_loss(student_logits, teacher_logits, batch.loss_mask, self.config, tp_group=tp_group,
                         vocab_size=vocab_size)
        return MethodOutput(out.loss, {name: getattr(out, name).detach().float() for name in self.logs})
