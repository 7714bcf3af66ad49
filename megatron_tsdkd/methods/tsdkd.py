"""TSD-KD: gated generalized JSD + entropy regularisation + teacher re-ranking of the student's candidates."""
import dataclasses
from dataclasses import dataclass

from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.losses.sequence_ranking import sequence_ranking_loss
from megatron_tsdkd.losses.term_gradients import term_gradient_norms
from megatron_tsdkd.losses.tsdkd import DIAGNOSTICS
from megatron_tsdkd.methods.base import DistillationMethod, MethodConfig, MethodOutput, ShareWarning, register


@dataclass(frozen=True)
class TSDKDConfig(TSDKDLossConfig, MethodConfig):
    """The loss library's settings (validated there) plus the method's name: one type, one set of checks."""


@register
class TSDKD(DistillationMethod):
    name = "tsdkd"
    Config = TSDKDConfig
    logs = ("direct", "entropy", "indirect", "gate_mean", "opener_length", "selected_count")
    diagnostics = DIAGNOSTICS   # term gradient shares and selection statistics (losses/tsdkd.py), logging steps only

    def loss(self, student_logits, teacher_logits, batch, *, tp_group=None, vocab_size=None):
        # indirect_level=sequence: the token-level ranking is replaced by the teacher's ranking of whole responses
        sequence = self.config.use_indirect and self.config.indirect_level == "sequence"
        config = dataclasses.replace(self.config, use_indirect=False) if sequence else self.config
        out = tsdkd_loss(student_logits, teacher_logits, batch.loss_mask, config, tp_group=tp_group,
                         vocab_size=vocab_size, diagnose=self.logging_step)
        loss, metrics = out.loss, {name: getattr(out, name).detach().float() for name in self.logs}
        if sequence:
            indirect = sequence_ranking_loss(student_logits, teacher_logits, batch.labels, batch.loss_mask,
                                             batch.input_ids, batch.prompt_lengths, tp_group=tp_group,
                                             vocab_size=vocab_size, chunk_size=self.config.chunk_size)
            loss, metrics["indirect"] = loss + self.config.alpha * indirect, indirect.detach().float()
            if self.logging_step:   # the term shares with the sequence-level ranking term in place of the token one
                c = self.config
                weighted = {"direct": out.direct, "entropy": c.gamma_em * out.entropy if c.use_entropy else
                            out.entropy.detach() * 0, "indirect": c.alpha * indirect}
                norms, shares = term_gradient_norms(weighted, student_logits, tp_group)
                out.diagnostics.update({f"grad_norm/{k}": v.float() for k, v in norms.items()})
                out.diagnostics.update({f"grad_share/{k}": v.float() for k, v in shares.items()})
        return MethodOutput(loss, metrics, out.diagnostics)

    def share_warning(self):
        if not self.config.direct_share_warning:
            return None
        return ShareWarning("grad_share/direct", self.config.direct_share_warning, self.config.direct_share_patience,
                            "the distillation term hardly reaches the student; method.gamma_em (entropy term) and "
                            "method.alpha (ranking term) scale the others")
