"""TSD-KD: gated generalized JSD + entropy regularisation + teacher re-ranking of the student's candidates.

``balance: shares`` keeps a ``TermBalance`` (losses/term_balance.py) here, across steps: its weights are averaged
over the data-parallel group, and its state is part of ``state_dict`` (the trainer's checkpoint).
"""
import dataclasses
from dataclasses import dataclass
from functools import partial

from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.losses.sequence_ranking import sequence_ranking_loss
from megatron_tsdkd.losses.term_balance import TermBalance
from megatron_tsdkd.losses.term_gradients import term_gradient_norms
from megatron_tsdkd.losses.tsdkd import DIAGNOSTICS, TERMS
from megatron_tsdkd.methods.base import (DistillationMethod, LossContext, MethodConfig, MethodOutput, ShareWarning,
                                         register, targets_of)


@dataclass(frozen=True)
class TSDKDConfig(TSDKDLossConfig, MethodConfig):
    """The loss library's settings (validated there) plus the method's name: one type, one set of checks."""


@register
class TSDKD(DistillationMethod):
    name = "tsdkd"
    Config = TSDKDConfig
    logs = ("direct", "entropy", "indirect", "gate_mean", "opener_length", "selected_count")
    diagnostics = DIAGNOSTICS   # term gradient shares and selection statistics (losses/tsdkd.py), logging steps only
    BALANCE_WEIGHTS = tuple(f"balance/weight_{t}" for t in TERMS)

    def __init__(self, config):
        super().__init__(config)
        self.balance = None
        if config.balance == "shares":
            shares = config.target_shares
            self.balance = TermBalance((shares.direct, shares.entropy, shares.indirect),
                                       (True, config.use_entropy, config.use_indirect), config.balance_decay)
            self.diagnostics = DIAGNOSTICS + self.BALANCE_WEIGHTS   # logged with the others

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        # indirect_level=sequence: the token-level ranking is replaced by the teacher's ranking of whole responses
        sequence = self.config.use_indirect and self.config.indirect_level == "sequence"
        config = dataclasses.replace(self.config, use_indirect=False) if sequence else self.config
        # reference_compat: the released rules see each row's completion block, from its prompt end on
        start = batch.prompt_lengths - 1 if config.reference_compat else None
        balance = partial(self._balance_weights, group=ctx.dp_group) if self.balance else None
        out = tsdkd_loss(student_logits, teacher_logits, batch.loss_mask, config, tp_group=ctx.tp_group,
                         vocab_size=ctx.vocab_size, diagnose=ctx.diagnose, completion_start=start, balance=balance,
                         targets=targets_of(batch))
        loss, metrics = out.loss, {name: getattr(out, name).detach().float() for name in self.logs}
        if sequence:
            indirect = sequence_ranking_loss(student_logits, teacher_logits, batch.labels, batch.loss_mask,
                                             batch.input_ids, batch.prompt_lengths, tp_group=ctx.tp_group,
                                             vocab_size=ctx.vocab_size, chunk_size=self.config.chunk_size,
                                             targets=targets_of(batch))
            loss, metrics["indirect"] = loss + self.config.alpha * indirect, indirect.detach().float()
            if ctx.diagnose:   # the term shares with the sequence-level ranking term in place of the token one
                c = self.config
                weighted = {"direct": out.direct, "entropy": c.gamma_em * out.entropy if c.use_entropy else
                            out.entropy.detach() * 0, "indirect": c.alpha * indirect}
                norms, shares = term_gradient_norms(weighted, student_logits, ctx.tp_group)
                out.diagnostics.update({f"grad_norm/{k}": v.float() for k, v in norms.items()})
                out.diagnostics.update({f"grad_share/{k}": v.float() for k, v in shares.items()})
        if self.balance and ctx.diagnose:
            out.diagnostics.update({name: w.float() for name, w in zip(self.BALANCE_WEIGHTS, out.term_weights)})
        return MethodOutput(loss, metrics, out.diagnostics)

    def _balance_weights(self, norms, group):
        return self.balance.weights() if norms is None else self.balance.update(norms, group=group)

    def state_dict(self) -> dict:
        return {"balance": self.balance.state_dict()} if self.balance else {}

    def load_state_dict(self, state: dict) -> None:
        if self.balance and "balance" in state:
            self.balance.load_state_dict(state["balance"])

    def share_warning(self):
        if not self.config.direct_share_warning:
            return None
        return ShareWarning("grad_share/direct", self.config.direct_share_warning, self.config.direct_share_patience,
                            "the distillation term hardly reaches the student; method.gamma_em (entropy term) and "
                            "method.alpha (ranking term) scale the others")

