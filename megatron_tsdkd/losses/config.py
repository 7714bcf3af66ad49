"""Typed settings of the TSD-KD loss (defaults from docs/METHOD.md), checked once with one-line errors.

The ``tsdkd`` method uses this type as its config (methods/tsdkd.py), so a value is validated here and nowhere else.
The two ``direct_share_*`` settings do not change the loss: they say when the trainer warns that the distillation
term hardly reaches the student (``grad_share/direct``, losses/term_gradients.py, measured at logging steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_tsdkd.checks import require, require_flags


@dataclass(frozen=True)
class TSDKDLossConfig:
    beta: float = 0.9              # generalized JSD interpolation: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0       # distillation temperature T: every softmax sees logits / T
    tau: float = 1.0               # temperature of the entropy gate sigmoid((H_S - H_T) / tau)
    gamma_em: float = 1.0          # weight of the entropy regularisation
    rho: float = 0.1               # fraction of response positions (highest student entropy) in the entropy term
    alpha: float = 0.1             # weight of the indirect (Plackett-Luce) term
    opener_fraction: float = 0.1   # c: cumulative student-entropy fraction that ends a response's opener
    top_k: int = 10                # K: student candidates re-ranked by the teacher
    use_gate: bool = True
    use_entropy: bool = True
    use_indirect: bool = True
    reference_compat: bool = False  # reproduce the released reference code (METHOD.md section 6) instead of the paper
    # token: re-rank the student's top-K next tokens (the paper); sequence: re-rank rollout.num_samples whole
    # responses per prompt by the teacher's length-normalised log-likelihood (losses/sequence_ranking.py)
    indirect_level: Literal["token", "sequence"] = "token"
    chunk_size: int = 1024         # tokens upcast to fp32 at a time
    direct_share_warning: float = 0.05   # warn when L_direct's share of the logit-gradient norm stays below this
    direct_share_patience: int = 3       # ... for this many consecutive logged steps (warning 0: never warn)

    def __post_init__(self) -> None:
        require(0.0 <= self.beta <= 1.0, "beta", self.beta, "must lie in [0, 1]")
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require(self.tau > 0, "tau", self.tau, "must be > 0")
        require(self.gamma_em >= 0, "gamma_em", self.gamma_em, "must be >= 0")
        require(0.0 < self.rho <= 1.0, "rho", self.rho, "must lie in (0, 1]")
        require(self.alpha >= 0, "alpha", self.alpha, "must be >= 0")
        require(0.0 < self.opener_fraction <= 1.0, "opener_fraction", self.opener_fraction, "must lie in (0, 1]")
        require(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", self.top_k, "must be an integer >= 1")
        require(isinstance(self.chunk_size, int) and self.chunk_size >= 1, "chunk_size", self.chunk_size,
                "must be an integer >= 1")
        require_flags(self, "use_gate", "use_entropy", "use_indirect", "reference_compat")
        require(self.indirect_level in ("token", "sequence"), "indirect_level", self.indirect_level,
                "must be token or sequence")
        require(0.0 <= self.direct_share_warning < 1.0, "direct_share_warning", self.direct_share_warning,
                "must lie in [0, 1) (0 turns the warning off)")
        require(isinstance(self.direct_share_patience, int) and self.direct_share_patience >= 1,
                "direct_share_patience", self.direct_share_patience, "must be an integer >= 1")
