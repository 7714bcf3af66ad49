"""The typed configuration tree: YAML file + ``key=value`` overrides, validated before any process-group work.

Every user error ends in one ``ConfigError`` line that names the key (and the file), e.g.
``configs/x.yaml: method.beta: must be within [0, 1], got 1.5``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


@dataclass
class ModelConfig:
    path: str = ""                      # Hugging Face folder, or a megatron checkpoint folder (format: mcore)
    format: Literal["hf", "mcore"] = "hf"


@dataclass
class ModelsConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str = ""                 # default: the student's folder


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1


@dataclass
class DataConfig:
    train: str = ""                     # JSONL: messages | prompt/response | instruction/response
    eval: str = ""                      # held-out JSONL with answers, scored after training if set
    max_length: int = 512               # prompt + response tokens
    max_prompt_length: int = 256
    shuffle: bool = True


@dataclass
class MethodConfig:
    name: Literal["sft", "kd", "gkd", "distillm", "tsdkd"] = "tsdkd"
    beta: float = 0.9                   # generalized JSD interpolation (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0            # distillation temperature
    tau: float = 1.0                    # entropy-gate temperature
    gamma_em: float = 1.0               # entropy-regularisation weight
    rho: float = 0.1                    # top fraction of positions by student entropy
    alpha: float = 0.1                  # indirect (Plackett-Luce) weight
    opener_fraction: float = 0.1        # c: cumulative entropy fraction that ends the opener
    top_k: int = 10                     # candidates re-ranked by the teacher
    use_gate: bool = True
    use_entropy: bool = True
    use_indirect: bool = True
    reference_compat: bool = False      # reproduce the released reference code instead of the paper
    skew_alpha: float = 0.1             # DistiLLM skew
    distillm_divergence: Literal["skew_kl", "skew_rkl"] = "skew_kl"
    chunk_size: int = 1024              # tokens per chunk in the vocab-parallel losses


@dataclass
class RolloutConfig:
    on_policy_prob: float = 1.0         # lambda: probability that a step's responses are sampled by the student
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    greedy: bool = False
    max_new_tokens: int = 128
    num_samples: int = 1                # responses per prompt


@dataclass
class OptimizerConfig:
    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int = 0                  # 0 = derived from epochs and the data set size
    warmup_fraction: float = 0.1
    decay: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class BatchConfig:
    global_size: int = 128              # sequences per optimizer step, over all data-parallel ranks
    micro_size: int = 1                 # sequences per forward/backward on one rank


@dataclass
class PrecisionConfig:
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@dataclass
class CheckpointConfig:
    dir: str = "outputs/checkpoints"
    interval: int = 100                 # optimizer steps; 0 = only at the end and on signals
    keep_last: int = 2
    resume: str = "auto"                # auto | none | a checkpoint folder
    export_hf: str = ""                 # write the final student as a Hugging Face folder here


@dataclass
class LoggingConfig:
    dir: str = "outputs/tensorboard"
    interval: int = 1
    progress_bar: bool = True


@dataclass
class MemoryCheckConfig:
    gpu_memory_gib: float = 80.0
    enforce: bool = True                # refuse layouts the planner says cannot fit (GPU only)


@dataclass
class TrainConfig:
    seed: int = 1234
    models: ModelsConfig = field(default_factory=ModelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryCheckConfig = field(default_factory=MemoryCheckConfig)


# ---------------------------------------------------------------------------------------------------------------
# Building the tree from plain data, with one-line errors


def _coerce(key: str, value, hint):
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        return _coerce(key, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} at {key}")


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            tip = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{prefix}{key}: unknown key{tip}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", data[name], hint)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. method.beta=0.5")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _merge(tree: dict, path: list[str], value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _check(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    m, r, b = cfg.method, cfg.rollout, cfg.batch
    for key, value in [("method.beta", m.beta), ("method.rho", m.rho), ("method.opener_fraction", m.opener_fraction),
                       ("method.skew_alpha", m.skew_alpha), ("rollout.on_policy_prob", r.on_policy_prob),
                       ("rollout.top_p", r.top_p), ("schedule.warmup_fraction", cfg.schedule.warmup_fraction)]:
        need(0.0 <= value <= 1.0, key, f"must be within [0, 1], got {value}")
    for key, value in [("method.temperature", m.temperature), ("method.tau", m.tau),
                       ("optimizer.lr", cfg.optimizer.lr)]:
        need(value > 0, key, f"must be positive, got {value}")
    need(r.temperature > 0 or r.greedy, "rollout.temperature", f"must be positive (or set rollout.greedy), got {r.temperature}")
    for key, value in [("method.top_k", m.top_k), ("method.chunk_size", m.chunk_size), ("parallel.tensor", cfg.parallel.tensor),
                       ("parallel.pipeline", cfg.parallel.pipeline), ("batch.global_size", b.global_size),
                       ("batch.micro_size", b.micro_size), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("rollout.num_samples", r.num_samples), ("data.max_length", cfg.data.max_length),
                       ("data.max_prompt_length", cfg.data.max_prompt_length)]:
        need(value >= 1, key, f"must be at least 1, got {value}")
    need(r.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 = off), got {r.top_k}")
    need(cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length",
         f"must be below data.max_length ({cfg.data.max_length}), got {cfg.data.max_prompt_length}")
    need(b.global_size % b.micro_size == 0, "batch.global_size",
         f"{b.global_size} is not a multiple of batch.micro_size ({b.micro_size})")
    need(bool(cfg.models.student.path), "models.student.path", "is required")
    need(m.name == "sft" or bool(cfg.models.teacher.path), "models.teacher.path",
         f"is required for method {m.name}")
    need(bool(cfg.data.train), "data.train", "is required")
    need(m.name not in ("sft", "kd") or r.on_policy_prob == 0.0, "rollout.on_policy_prob",
         f"method {m.name} trains on the data set's responses; set it to 0 (got {r.on_policy_prob})")


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """Read a YAML file (optional), apply ``a.b=value`` overrides, validate. Relative paths in the file are kept
    as written (resolved against the working directory, as users expect from a launcher)."""
    tree: dict = {}
    where = path or "overrides"
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(tree, keys, value)
    try:
        cfg = _build(TrainConfig, tree)
        _check(cfg)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
