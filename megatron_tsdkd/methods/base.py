"""The one small interface every distillation method implements, and the registry the trainer looks methods up in.

A method turns the last pipeline stage's vocab-sharded logits of both models into a scalar loss and a few metrics.
It knows the tensor-parallel group it is handed and nothing else about the parallel layout; the trainer knows no
method's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from megatron_tsdkd.config import MethodConfig


@dataclass
class MethodOutput:
    loss: torch.Tensor                                   # fp32 scalar, mean over the micro-batch's response tokens
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)   # detached scalars for logging


class DistillationMethod:
    """Base class. ``batch`` carries ``labels`` [b, s] and ``loss_mask`` [b, s] (1.0 on response targets)."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    allows_on_policy: ClassVar[bool] = True

    def __init__(self, config: MethodConfig):
        self.config = config

    def loss(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], batch: dict,
             *, tp_group=None, vocab_size: Optional[int] = None) -> MethodOutput:
        raise NotImplementedError


METHODS: dict[str, type[DistillationMethod]] = {}


def register(cls: type[DistillationMethod]) -> type[DistillationMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(config: MethodConfig) -> DistillationMethod:
    try:
        cls = METHODS[config.name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {config.name!r} (known: {', '.join(sorted(METHODS))})") from None
    return cls(config)
