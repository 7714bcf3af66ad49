"""Typed settings of the TSD-KD loss (defaults from docs/METHOD.md), checked once with one-line errors.

The ``tsdkd`` method uses this type as its config (methods/tsdkd.py), so a value is validated here and nowhere else.
The two ``direct_share_*`` settings do not change the loss: they say when the trainer warns that the distillation
term hardly reaches the student (``grad_share/direct``, losses/term_gradients.py, measured at diagnostic steps: ``logging.diagnostics_interval``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_tsdkd.checks import require, require_flags


@dataclass(frozen=True)
class TermShares:
    """Target shares of the logit-gradient norm for ``balance: shares`` (losses/term_balance.py); they sum to 1.
    Default: the distillation term leads with 0.6 and each auxiliary term (entropy, ranking) gets a fifth."""
    direct: float = 0.6
    entropy: float = 0.2
    indirect: float = 0.2

    def __post_init__(self) -> None:
        for name in ("direct", "entropy", "indirect"):
            require(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "must lie in [0, 1]")


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
    direct_share_patience: int = 3       # ... for this many consecutive diagnostic steps (warning 0: never warn)
    # Beyond the paper, off by default: `shares` re-weights the three terms every micro-batch so that each carries
    # its target share of the logit-gradient norm (losses/term_balance.py; smoothed by an EMA with this decay)
    balance: Literal["none", "shares"] = "none"
    target_shares: TermShares = field(default_factory=TermShares)
    balance_decay: float = 0.9

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
        # The released code has no such settings: its loss runs at temperature 1 (its `temperature` only samples:
        # our rollout.temperature) and one `threshold` is both rho and the opener fraction (METHOD.md section 6).
        require(not self.reference_compat or self.temperature == 1.0, "temperature", self.temperature,
                "must be 1 with reference_compat=true (the released loss runs at temperature 1; its temperature "
                "setting only samples: set rollout.temperature)")
        require(not self.reference_compat or self.opener_fraction == self.rho, "opener_fraction",
                self.opener_fraction, f"must equal rho ({self.rho}) with reference_compat=true (the released code "
                "drives both with one threshold)")
        require(self.indirect_level in ("token", "sequence"), "indirect_level", self.indirect_level,
                "must be token or sequence")
        require(0.0 <= self.direct_share_warning < 1.0, "direct_share_warning", self.direct_share_warning,
                "must lie in [0, 1) (0 turns the warning off)")
        require(isinstance(self.direct_share_patience, int) and self.direct_share_patience >= 1,
                "direct_share_patience", self.direct_share_patience, "must be an integer >= 1")
        require(self.balance in ("none", "shares"), "balance", self.balance, "must be none or shares")
        shares = self.target_shares
        require(isinstance(shares, TermShares), "target_shares", shares, "must be a mapping of direct, entropy, "
                "indirect")
        require(math.isclose(shares.direct + shares.entropy + shares.indirect, 1.0, abs_tol=1e-6), "target_shares",
                shares, "must sum to 1")
        require(0.0 <= self.balance_decay < 1.0, "balance_decay", self.balance_decay, "must lie in [0, 1)")
        require(self.balance == "none" or self.indirect_level == "token", "balance", self.balance,
                "must be none with indirect_level=sequence (the balance weighs the token-level terms only)")
