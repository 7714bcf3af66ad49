"""The one small interface every distillation method implements, and the registry that is the one source of
method facts: each method's typed settings, whether it needs a teacher, whether it may train on the student's own
samples, and what it logs. ``config.load_config`` validates the ``method:`` section through this registry.

A method turns the last pipeline stage's vocab-sharded logits of both models into a scalar loss and a few metrics,
each the micro-batch value that docs/METHOD.md defines (a mean over its response tokens). The trainer weights
micro-batches by their response tokens (per-token normalisation over the optimizer step). A method knows the
tensor-parallel group it is handed and nothing else about the parallel layout; the trainer knows no method's
internals.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from megatron_tsdkd.checks import require

if TYPE_CHECKING:
    from megatron_tsdkd.data import TrainingBatch

DEFAULT_METHOD = "tsdkd"


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method has; a method's own config type extends it."""

    name: str = DEFAULT_METHOD
    chunk_size: int = 1024              # tokens per chunk in the vocab-parallel losses

    def __post_init__(self) -> None:
        require(isinstance(self.chunk_size, int) and self.chunk_size >= 1, "chunk_size", self.chunk_size,
                "must be an integer >= 1")


@dataclass(frozen=True)
class DistillationConfig(MethodConfig):
    """Settings of methods that compare the student's distribution with the teacher's."""

    temperature: float = 1.0            # distillation temperature: every softmax sees logits / T

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")


@dataclass(frozen=True)
class LossContext:
    """What a method's loss needs beyond its tensors, handed over by the trainer (methods and losses read no global
    parallel state): the tensor-parallel group the logits are sharded over (None: one device), the data-parallel
    group a method that keeps state across steps averages over (None: the default group), the real vocabulary (ids
    at or above it are padding rows), and whether this step computes the method's diagnostics (they cost extra
    work, e.g. one backward per loss term, so only on logging.diagnostics_interval steps)."""
    tp_group: Any = None
    dp_group: Any = None
    vocab_size: Optional[int] = None
    diagnose: bool = False


@dataclass
class MethodOutput:
    loss: torch.Tensor                                   # fp32 scalar, the micro-batch loss (mean over its targets)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)   # detached scalars, logged as loss/<name>
    # Detached scalars under their own TensorBoard names (DistillationMethod.diagnostics), filled on diagnostic
    # steps only (logging.diagnostics_interval); not token-weighted loss terms: the trainer averages them over
    # micro-batches and data-parallel ranks.
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ShareWarning:
    """Ask the trainer for a one-line warning on rank 0 when the logged diagnostic ``metric`` stays below
    ``threshold`` for ``patience`` consecutive logged steps; ``advice`` names the config keys to change."""
    metric: str
    threshold: float
    patience: int
    advice: str


class DistillationMethod:
    """Base class. Subclasses set the class facts below and implement ``loss``."""

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    needs_teacher: ClassVar[bool] = True
    on_policy: ClassVar[bool] = True              # may train on responses the student samples (rollout.on_policy_prob)
    logs: ClassVar[tuple[str, ...]] = ()          # metric names it reports (TensorBoard loss/<name>)
    diagnostics: ClassVar[tuple[str, ...]] = ()   # MethodOutput.diagnostics names it reports on logging steps
    # True: the on-policy rollout is a co-generation of student and teacher (generation/co_generation.py), not the
    # student's own sampling; such a method also defines ``co_sampling()`` -> co_generation.CoSampling (the rule).
    co_generation: ClassVar[bool] = False
    # True: the loss weighs tokens by the rollout's own sampling law (importance weights), so the rollout must sample
    # from the plain softmax: rollout.temperature 1, no top_k / top_p, not greedy (config.load_config checks it).
    needs_exact_sampling: ClassVar[bool] = False
    # The engines that can run it and why not the others: engine=deepspeed has the student's own generate only and
    # the plain data path (no co-generation, no per-epoch weighted samples).
    engines: ClassVar[tuple[str, ...]] = ("megatron", "deepspeed")

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.Config):
            raise TypeError(f"method {self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def default_on_policy_prob(cls) -> float:
        """lambda when the user sets none: on-policy for methods that support it (METHOD.md default 1.0)."""
        return 1.0 if cls.on_policy else 0.0

    def loss(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], batch: "TrainingBatch",
             ctx: LossContext = LossContext()) -> MethodOutput:
        raise NotImplementedError

    def share_warning(self) -> Optional[ShareWarning]:
        """The diagnostic the trainer should watch, if any (from the method's settings)."""
        return None

    def state_dict(self) -> dict:
        """State the method carries from step to step (e.g. TSD-KD's term balance), saved in the trainer's
        checkpoint so a resumed run continues exactly; plain Python data. Most methods have none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (an empty dict: nothing saved, e.g. an older checkpoint)."""


def targets_of(batch: "TrainingBatch"):
    """The batch's targets as collated on the host (``TrainingBatch.targets``), for the losses' ``targets``: then
    no loss reads the device to find them. None for a batch built without them (the loss reads the mask)."""
    return getattr(batch, "targets", None)


METHODS: dict[str, type[DistillationMethod]] = {}


def register(cls: type[DistillationMethod]) -> type[DistillationMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[DistillationMethod]:
    """The registered method called ``name``; ValueError naming the key and the known methods otherwise."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    tip = f"; did you mean {close[0]}?" if close else ""
    raise ValueError(f"name: unknown method {name!r} (known: {', '.join(sorted(METHODS))}){tip}")


def setting_names(config_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config_type))


def build_method(config: MethodConfig) -> DistillationMethod:
    return method_class(config.name)(config)
