"""KPOD (Feng et al., ICML 2024; METHOD.md KPOD): off-policy CoT distillation on teacher rationales with keypoint
token weights and an in-rationale progressive schedule, both prepared offline by ``tsdkd-kpod-prepare``.

Loss (the per-token weights a_j arrive as ``batch.loss_mask``, materialised per epoch by kpod/samples.py):

    L_o(t) = sum_j a_j (-log P(r_j | r_<j, x)) / #(a_j != 0)

the vocab-parallel cross-entropy of losses/cross_entropy.py, which weights by the float mask values; the trainer
normalises per target (targets with a_j != 0), so given steps (a_j = 0) neither carry loss nor count.
"""
from dataclasses import dataclass

from megatron_tsdkd.checks import require, require_flags
from megatron_tsdkd.losses import cross_entropy_loss
from megatron_tsdkd.methods.base import (DistillationMethod, LossContext, MethodConfig, MethodOutput, register,
                                         targets_of)


@dataclass(frozen=True)
class KPODConfig(MethodConfig):
    prepared_dir: str = ""              # the folder tsdkd-kpod-prepare wrote (artefacts.py lists its files)
    use_token_weights: bool = True      # Table 2 "w/o token weights": a_j = 1 on every learned rationale token
    # The schedule's switches are fixed when it is prepared; the config states them so a run cannot silently train
    # on a schedule prepared with other ones (samples.check_schedule_settings compares them).
    weights_in_difficulty: bool = True  # "w/o weights in difficulty": d_k is the step's mean NLL
    use_progression: bool = True        # "w/o progression": c_i(t) = 0 from the first epoch
    use_diversity: bool = True          # "w/o diversity": beta_div = 0 in the knapsack
    beta_div: float = 12.0
    num_clusters: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.prepared_dir, str), "prepared_dir", self.prepared_dir,
                "must name the folder written by tsdkd-kpod-prepare")   # emptiness: checked with the inputs
        require_flags(self, "use_token_weights", "weights_in_difficulty", "use_progression", "use_diversity")
        require(isinstance(self.beta_div, (int, float)) and self.beta_div >= 0, "beta_div", self.beta_div, "must be >= 0")
        require(isinstance(self.num_clusters, int) and self.num_clusters >= 1, "num_clusters", self.num_clusters,
                "must be an integer >= 1")

    def schedule_settings(self) -> dict:
        """What the prepared schedule depends on (recorded in schedule.json)."""
        return {"weights_in_difficulty": self.weights_in_difficulty, "use_progression": self.use_progression,
                "beta_div": float(self.beta_div) if self.use_diversity else 0.0, "num_clusters": self.num_clusters}


@register
class KPOD(DistillationMethod):
    name = "kpod"
    engines = ("megatron",)
    Config = KPODConfig
    needs_teacher = False
    on_policy = False
    logs = ("weighted_nll",)

    def loss(self, student_logits, teacher_logits, batch, ctx=LossContext()):
        loss = cross_entropy_loss(student_logits, batch.labels, batch.loss_mask, tp_group=ctx.tp_group,
                                  vocab_size=ctx.vocab_size, chunk_size=self.config.chunk_size, targets=targets_of(batch))
        return MethodOutput(loss, {"weighted_nll": loss.detach()})
