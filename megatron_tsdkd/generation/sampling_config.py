"""How to pick each new token; validated on construction so a bad value fails before any forward pass.

The training config's ``rollout`` section is this type plus lambda (config.RolloutConfig), so the settings and
their checks exist once."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tsdkd.checks import require, require_flags


@dataclass(frozen=True)
class SamplingConfig:
    """``greedy`` takes the most likely token; otherwise a token is drawn from
    softmax(logits / temperature), restricted to the ``top_k`` most likely tokens (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (1.0: all), as transformers' samplers do."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    greedy: bool = False
    num_samples: int = 1                # responses per prompt
    # decode reads "has every row stopped?" back to the host every N tokens only (the loop's one host sync);
    # finished rows produce padding meanwhile, so the responses are those of a check at every token
    stop_check_interval: int = 16

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        require(isinstance(self.stop_check_interval, int) and self.stop_check_interval >= 1, "stop_check_interval",
                self.stop_check_interval, "must be an integer >= 1")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 disables it)")
        require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must lie in (0, 1]")
        require_flags(self, "greedy")
        require(self.greedy or self.temperature > 0.0, "temperature", self.temperature,
                "must be > 0 when sampling (or set greedy)")
