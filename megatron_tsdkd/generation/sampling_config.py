"""How to pick each new token; validated on construction so a bad value fails before any forward pass."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    """``greedy`` takes the most likely token; otherwise a token is drawn from
    softmax(logits / temperature), restricted to the ``top_k`` most likely tokens (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (1.0: all), as transformers' samplers do."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    num_samples: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.is_greedy and self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy=True instead")

    @property
    def is_greedy(self) -> bool:
        return self.greedy
