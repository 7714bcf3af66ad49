"""The typed configuration tree: YAML file + ``key=value`` overrides, validated before any process-group work.

Every user error ends in one ``ConfigError`` line that names the key (and the file), e.g.
``configs/x.yaml: method.beta: must be within [0, 1], got 1.5``.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from megatron_tsdkd.checks import require
from megatron_tsdkd.data.records import Fields
from megatron_tsdkd.generation.sampling_config import SamplingConfig
from megatron_tsdkd.methods import METHODS, DEFAULT_METHOD, MethodConfig, method_class, setting_names
from megatron_tsdkd.models.attention import ATTENTION_BACKENDS
from megatron_tsdkd.models.builder import RECOMPUTE_MODES
from megatron_tsdkd.models.dtypes import DTYPE_NAMES

log = logging.getLogger("megatron_tsdkd.config")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


@dataclass
class ModelConfig:
    path: str = ""                      # HF folder | megatron checkpoint | training run folder (its `latest`)
    format: Literal["auto", "hf", "mcore"] = "auto"   # auto: an HF folder has config.json


@dataclass
class ModelsConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str = ""                 # default: the student's folder
    attention: Literal[ATTENTION_BACKENDS] = "auto"   # auto: Transformer Engine if importable, else SDPA on GPU, local on CPU
    recompute: Literal[RECOMPUTE_MODES] = "none"      # student activation recompute (the teacher keeps no activations)
    # a mixture-of-experts student's router load-balancing loss (megatron-core's aux_loss, whatever the method;
    # logged as loss/router_aux before this factor); unset: the student's HF router_aux_loss_coef, 0 turns it off
    router_aux_loss_coef: Optional[float] = None


@dataclass
class TeacherParallelConfig:
    tensor: Optional[int] = None        # unset: the student's (parallel.tensor)
    pipeline: Optional[int] = None      # unset: the student's (parallel.pipeline)
    # in the student's layout: ride in the student's pipeline stages, one schedule for both (true), or run on groups
    # of its own with its own forward pass as in any other layout (false; benchmarks/teacher_layout_step.py)
    colocated: bool = True
    # experts of a mixture-of-experts teacher split over this many of its data-parallel replicas (megatron-core's
    # expert parallelism; each expert itself split over the teacher's tensor parallelism). A MoE teacher rides
    # co-located only at the student's parallel.expert; any other value gives it groups of its own
    expert: int = 1


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1                     # a mixture-of-experts student's experts over this many data-parallel ranks
    # the teacher's own layout (engines/megatron/teacher_layout.py); its data parallelism fills the world
    teacher: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)


@dataclass
class DataConfig:
    train: str = ""                     # JSONL(.gz) | parquet file or folder of shards | .arrow | save_to_disk folder
    eval: str = ""                      # held-out data with answers (same formats), scored after training if set
    max_length: int = 512               # prompt + response tokens
    max_prompt_length: int = 256
    shuffle: bool = True
    group_by_length: bool = False       # similar lengths share a step (off-policy: prompt + response; on-policy: prompt)
    cache_dir: str = "auto"             # tokenised sets, built once, memory-mapped; auto: data_cache beside logging.dir
                                        # (outputs/data_cache); none: tokenise in memory on every rank
    fields: Fields = field(default_factory=Fields)   # column mapping: data.fields.prompt=question ...


ROLLOUT_ENGINES = ("megatron", "vllm", "auto")


@dataclass(frozen=True)
class RolloutConfig(SamplingConfig):
    """How the student samples on-policy responses (generation's SamplingConfig) and how often (lambda)."""

    on_policy_prob: Optional[float] = None   # lambda; unset: 1.0 for methods that train on-policy, else 0.0
    # who samples: our KV-cached decode under the training TP/PP (megatron), a colocated TP=1 vLLM replica per
    # rank fed by a weight sync after each optimizer step (vllm; generation/vllm_rollouts.py), or vllm where it
    # is installed and supports the student, else megatron (auto; the start-up summary says which)
    engine: str = "megatron"
    vllm_memory_fraction: float = 0.3        # GPU share of each replica (weights + KV cache) while it samples
    weight_sync_bucket_mb: int = 256         # the vLLM weight sync moves parameters in buckets of this size (full)
    # the rollout guard (engines/rollout_guard.py): stop when the engine's log-probabilities of the tokens it
    # sampled differ from the trainer's by more than max_logprob_diff nats per token (rollout/logprob_diff) on
    # logprob_diff_patience on-policy steps in a row; patience 0 only logs
    max_logprob_diff: float = 0.5
    logprob_diff_patience: int = 3

    def __post_init__(self):
        super().__post_init__()
        p = self.on_policy_prob
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"on_policy_prob: must lie in [0, 1], got {p!r}")
        require(self.engine in ROLLOUT_ENGINES, "engine", self.engine, f"must be one of {', '.join(ROLLOUT_ENGINES)}")
        require(0.0 < self.vllm_memory_fraction < 1.0, "vllm_memory_fraction", self.vllm_memory_fraction,
                "must lie in (0, 1)")
        require(isinstance(self.weight_sync_bucket_mb, int) and self.weight_sync_bucket_mb >= 1,
                "weight_sync_bucket_mb", self.weight_sync_bucket_mb, "must be an integer >= 1 (MiB)")
        require(self.max_logprob_diff > 0.0, "max_logprob_diff", self.max_logprob_diff, "must be > 0 (nats)")
        require(isinstance(self.logprob_diff_patience, int) and self.logprob_diff_patience >= 0,
                "logprob_diff_patience", self.logprob_diff_patience, "must be an integer >= 0 (0: only log)")


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
    # megatron DDP: reduce(-scatter) each gradient bucket as soon as the backward has filled it; with the
    # distributed optimizer, all-gather the updated weights bucket by bucket during the next forward
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True   # with use_distributed_optimizer only (ignored without it)
    bucket_size: Optional[int] = None   # parameters per gradient bucket; unset: megatron's max(40M, 1M x DP)
    # fp16 only: megatron's dynamic loss scaling (halved after `loss_scale_hysteresis` overflowing steps, which are
    # skipped; doubled after `loss_scale_window` clean ones). The start is low because our micro-batch losses are
    # token SUMS (per-token normalisation comes after the backward, engines/megatron/engine.py): their gradients are
    # ~tokens times a mean loss's, for which megatron's 2**32 and torch's 2**16 are meant.
    loss_scale_initial: float = 1024.0
    loss_scale_window: int = 1000
    loss_scale_hysteresis: int = 2


@dataclass
class ScheduleConfig:
    epochs: int = 1
    max_steps: int = 0                  # 0 = derived from epochs and the data set size
    warmup_fraction: float = 0.1
    decay: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class BatchConfig:
    global_size: int = 128              # sequences per optimizer step, over all data-parallel ranks
    # sequences per forward/backward on one rank; auto: the largest the memory plan fits (planning/memory_plan.py)
    micro_size: Union[int, Literal["auto"]] = 1
    # sort the step's rows by length before cutting micro-batches (less padding); token-decomposable losses are
    # unchanged, TSD-KD's per-micro-batch entropy set and opener see other neighbours (data/collate.py)
    sort_by_length: bool = False


@dataclass
class PrecisionConfig:
    dtype: Literal[DTYPE_NAMES] = "bf16"


@dataclass
class CheckpointConfig:
    dir: str = "outputs/checkpoints"
    interval: int = 100                 # optimizer steps; 0 = only at the end and on signals
    keep_last: int = 2
    resume: str = "auto"                # auto | none | a checkpoint folder
    export_hf: str = ""                 # write the final student as a Hugging Face folder here
    allow_config_changes: bool = False  # resume although keys that decide the numbers changed (the new values win)
    async_save: bool = True             # a save blocks only for the copy to host memory; files written in the background


@dataclass
class LoggingConfig:
    """When a step logs (``logs``) and when the method computes its diagnostics (``diagnoses``): one rule for
    both engines. Diagnostics (TSD-KD's grad_share/*: one extra backward per loss term) cost more than the other
    metrics, hence their own, sparser interval; a diagnostic step is always a logged step."""

    dir: str = "outputs/tensorboard"
    interval: int = 1                   # metrics every N optimizer steps, and at the last step
    diagnostics_interval: int = 50      # a method's diagnostics every N steps, and at the last step
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("interval", "diagnostics_interval"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")

    def diagnoses(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` (1-based) computes the method's diagnostics (the last step does, for the end values)."""
        return step % self.diagnostics_interval == 0 or step >= total_steps

    def logs(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` (1-based) logs metrics."""
        return step % self.interval == 0 or self.diagnoses(step, total_steps)


@dataclass
class MemoryCheckConfig:
    gpu_memory_gib: float = 80.0
    # the host memory a node has for the job (planning/host_memory_plan.py); unset: what is available when it starts
    host_memory_gib: Optional[float] = None
    enforce: bool = True                # refuse layouts the planner says cannot fit (GPU, and each node's host)


@dataclass
class DeepSpeedConfig:
    """Settings of ``engine: deepspeed`` (engines/deepspeed/engine.py); ignored by the megatron engine."""

    zero_stage: int = 3                                # ZeRO stage of the student: 2 or 3
    offload_optimizer: Literal["none", "cpu"] = "none"   # Adam state (and its step) in CPU memory
    optimizer: Literal["torch_adam", "cpu_adam", "fused_adam"] = "torch_adam"   # which Adam implementation steps
    teacher_zero3_inference: bool = True               # partition the frozen teacher with ZeRO-3 (else a full copy per rank)


@dataclass
class TrainConfig:
    seed: int = 1234
    engine: Literal["megatron", "deepspeed"] = "megatron"   # deepspeed: HF models with ZeRO, no conversion
    models: ModelsConfig = field(default_factory=ModelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=lambda: method_class(DEFAULT_METHOD).Config())
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryCheckConfig = field(default_factory=MemoryCheckConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ---------------------------------------------------------------------------------------------------------------
# Building the tree from plain data, with one-line errors


def _coerce(key: str, value, hint):
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is typing.Union:  # Optional[X], or X | Literal[...] (e.g. an integer or "auto")
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        literals = [c for a in inner if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        if value in literals:
            return value
        try:
            return _coerce(key, value, next(a for a in inner if typing.get_origin(a) is not Literal))
        except ConfigError:
            raise ConfigError(f"{key}: expected {' or '.join(map(repr, literals))} or a value of type "
                              f"{next(a for a in inner if typing.get_origin(a) is not Literal).__name__}, "
                              f"got {value!r}") from None
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
        if hint is MethodConfig:
            kwargs[name] = _build_method(data[name], f"{prefix}{name}.")
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", data[name], hint)
    try:
        return cls(**kwargs)
    except ValueError as error:  # a section's own checks (checks.require): "<field>: <requirement>, got <value>"
        raise ConfigError(f"{prefix}{error}") from None


def _build_method(data, prefix: str):
    """The ``method:`` section as the typed config of the method it names (the registry says which type).
    Settings of other registered methods are ignored with a warning, so switching ``method.name`` on a config
    written for another method works; a key no method knows is an error."""
    data = dict(data or {}) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {data!r}")
    name = data.setdefault("name", DEFAULT_METHOD)
    try:
        config_type = method_class(name).Config
    except ValueError as error:
        raise ConfigError(f"{prefix}{error}") from None
    own = setting_names(config_type)
    others = {key for cls in METHODS.values() for key in setting_names(cls.Config)}
    ignored = sorted(k for k in data if k not in own and k in others)
    if ignored:
        log.warning("%s ignored: not settings of method %s", ", ".join(prefix + k for k in ignored), name)
    return _build(config_type, {k: v for k, v in data.items() if k not in ignored}, prefix)


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
    """Rules across sections, and ranges of the sections that have no checks of their own."""
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    method, b = method_class(cfg.method.name), cfg.batch
    need(0.0 <= cfg.schedule.warmup_fraction <= 1.0, "schedule.warmup_fraction",
         f"must lie in [0, 1], got {cfg.schedule.warmup_fraction}")
    need(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    o = cfg.optimizer
    need(o.bucket_size is None or o.bucket_size >= 1, "optimizer.bucket_size", f"must be >= 1, got {o.bucket_size}")
    need(o.loss_scale_initial >= 1, "optimizer.loss_scale_initial", f"must be >= 1, got {o.loss_scale_initial}")
    for key, value in [("optimizer.loss_scale_window", o.loss_scale_window),
                       ("optimizer.loss_scale_hysteresis", o.loss_scale_hysteresis)]:
        need(value >= 1, key, f"must be >= 1, got {value}")
    auto_micro = b.micro_size == "auto"   # resolved by the memory plan (planning/memory_plan.py)
    t = cfg.parallel.teacher
    for key, value in [("parallel.tensor", cfg.parallel.tensor), ("parallel.pipeline", cfg.parallel.pipeline),
                       ("parallel.teacher.tensor", 1 if t.tensor is None else t.tensor),
                       ("parallel.teacher.pipeline", 1 if t.pipeline is None else t.pipeline),
                       ("batch.global_size", b.global_size), ("batch.micro_size", 1 if auto_micro else b.micro_size),
                       ("data.max_length", cfg.data.max_length), ("data.max_prompt_length", cfg.data.max_prompt_length)]:
        need(value >= 1, key, f"must be >= 1, got {value}")
    need(cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length",
         f"must be below data.max_length ({cfg.data.max_length}), got {cfg.data.max_prompt_length}")
    need(auto_micro or b.global_size % b.micro_size == 0, "batch.global_size",
         f"{b.global_size} is not a multiple of batch.micro_size ({b.micro_size})")
    need(b.global_size % cfg.rollout.num_samples == 0, "rollout.num_samples",
         f"must divide batch.global_size ({b.global_size}), got {cfg.rollout.num_samples}")
    need(bool(cfg.models.student.path), "models.student.path", "is required")
    need(not method.needs_teacher or bool(cfg.models.teacher.path), "models.teacher.path",
         f"is required for method {method.name}")
    need(bool(cfg.data.train), "data.train", "is required")
    need(method.on_policy or not cfg.rollout.on_policy_prob, "rollout.on_policy_prob",
         f"method {method.name} trains on the data set's responses only; set it to 0 or leave it unset "
         f"(got {cfg.rollout.on_policy_prob})")
    r = cfg.rollout
    lam = r.on_policy_prob   # resolved before the checks (_resolve_defaults)
    need(not (method.needs_exact_sampling and lam)
         or (r.temperature == 1.0 and r.top_k == 0 and r.top_p == 1.0 and not r.greedy), "rollout",
         f"method {method.name} weighs tokens by the sampling law itself: set rollout.temperature=1 rollout.top_k=0 "
         f"rollout.top_p=1 rollout.greedy=false (got temperature {r.temperature}, top_k {r.top_k}, top_p {r.top_p}, "
         f"greedy {r.greedy})")
    need(not (method.co_generation and r.engine == "vllm"), "rollout.engine",
         f"method {method.name} picks each token from the student's and the teacher's logits together "
         f"(generation/co_generation.py), which vLLM cannot do; use rollout.engine=megatron (or auto)")
    coef = cfg.models.router_aux_loss_coef
    need(coef is None or (isinstance(coef, (int, float)) and coef >= 0), "models.router_aux_loss_coef",
         f"must be a number >= 0 or unset, got {coef!r}")
    for key, value in (("parallel.expert", cfg.parallel.expert), ("parallel.teacher.expert", cfg.parallel.teacher.expert)):
        need(isinstance(value, int) and value >= 1, key, f"must be an integer >= 1, got {value!r}")
    own_teacher_layout = (teacher_layout_of(cfg.parallel) != (cfg.parallel.tensor, cfg.parallel.pipeline)
                          or not cfg.parallel.teacher.colocated or cfg.parallel.teacher.expert != 1)
    need(not own_teacher_layout or method.needs_teacher, "parallel.teacher",
         f"method {method.name} has no teacher; unset parallel.teacher.tensor, parallel.teacher.pipeline, "
         f"parallel.teacher.expert and parallel.teacher.colocated")
    need(not (own_teacher_layout and method.co_generation and lam), "parallel.teacher",
         f"method {method.name} samples each token from the student's and the teacher's logits together "
         f"(generation/co_generation.py), which needs the teacher co-located in the student's layout; unset "
         f"parallel.teacher.tensor, parallel.teacher.pipeline and parallel.teacher.colocated, or set "
         f"rollout.on_policy_prob=0")
    need(cfg.engine in method.engines, "engine",
         f"method {method.name} runs on engine={' or '.join(method.engines)} only ("
         + ("it samples with student and teacher together, generation/co_generation.py" if method.co_generation
            else "engine=deepspeed has the plain data path only") + f"), got {cfg.engine}")
    _check_sequence_ranking(cfg, need)
    _check_deepspeed(cfg, need)


def teacher_layout_of(parallel: ParallelConfig) -> tuple[int, int]:
    """The teacher's (tensor, pipeline) sizes: parallel.teacher.*, each unset one the student's."""
    t = parallel.teacher
    return (parallel.tensor if t.tensor is None else t.tensor, parallel.pipeline if t.pipeline is None else t.pipeline)


def _check_sequence_ranking(cfg: TrainConfig, need) -> None:
    """method.indirect_level=sequence ranks the rollout's num_samples responses of each prompt, which the rollout
    lays out as consecutive rows (engines/megatron/engine.py _rollout) and micro_batches cuts in runs of micro_size rows:
    every step must be sampled (off-policy steps hold one data-set response per prompt) and no prompt's
    candidates may be split between micro-batches."""
    if getattr(cfg.method, "indirect_level", "token") != "sequence":
        return
    n, lam = cfg.rollout.num_samples, cfg.rollout.on_policy_prob
    need(n >= 2, "rollout.num_samples", f"must be >= 2 with method.indirect_level=sequence (the teacher ranks the "
                                        f"student's candidate responses of each prompt), got {n}")
    need(lam is None or lam == 1.0, "rollout.on_policy_prob",
         f"must be 1 (or unset) with method.indirect_level=sequence: off-policy steps carry one data-set response "
         f"per prompt, nothing to rank; got {lam}")
    need(not cfg.batch.sort_by_length, "batch.sort_by_length",
         "must be false with method.indirect_level=sequence: sorting rows by length would split a prompt's "
         "candidates between micro-batches")
    need(cfg.batch.micro_size == "auto" or cfg.batch.micro_size % n == 0, "batch.micro_size",
         f"must be a multiple of rollout.num_samples ({n}) with method.indirect_level=sequence, so each prompt's "
         f"candidates share a micro-batch; got {cfg.batch.micro_size}")


def _check_deepspeed(cfg: TrainConfig, need) -> None:
    """The DeepSpeed engine's rules. Optimizer x offload: torch_adam (torch.optim.AdamW, no JIT build) steps
    wherever the state lives; cpu_adam (DeepSpeedCPUAdam, a JIT-built op) steps only CPU-resident state, so it
    needs offload_optimizer=cpu; fused_adam (a GPU kernel) cannot step offloaded state."""
    d = cfg.deepspeed
    need(d.zero_stage in (2, 3), "deepspeed.zero_stage", f"must be 2 or 3, got {d.zero_stage}")
    need(not (d.offload_optimizer == "cpu" and d.optimizer == "fused_adam"), "deepspeed.offload_optimizer",
         "cpu needs an optimizer that steps on the CPU (torch_adam or cpu_adam); fused_adam steps on the GPU")
    need(not (d.optimizer == "cpu_adam" and d.offload_optimizer != "cpu"), "deepspeed.optimizer",
         "cpu_adam steps CPU-resident state only; set deepspeed.offload_optimizer=cpu or use torch_adam")
    if cfg.engine == "deepspeed":
        for key, value in (("parallel.tensor", cfg.parallel.tensor), ("parallel.pipeline", cfg.parallel.pipeline),
                           ("parallel.expert", cfg.parallel.expert)):
            need(value == 1, key, f"must be 1 with engine=deepspeed (ZeRO shards over data parallelism only), "
                                  f"got {value}; use engine=megatron for tensor/pipeline/expert parallelism")
        t = cfg.parallel.teacher
        for key, value, unset in (("parallel.teacher.tensor", t.tensor, None),
                                  ("parallel.teacher.pipeline", t.pipeline, None),
                                  ("parallel.teacher.expert", t.expert, 1),
                                  ("parallel.teacher.colocated", t.colocated, True)):
            need(value == unset, key, f"is for engine=megatron (engine=deepspeed partitions the teacher with ZeRO-3 "
                                      f"over every rank already); unset it, got {value}")
        need(cfg.models.recompute != "selective", "models.recompute",
             "selective (core attention only) is megatron-core's; engine=deepspeed offers none or full "
             "(transformers' gradient checkpointing)")


def default_config(method_name: str) -> TrainConfig:
    """Every key at its default for method ``method_name`` (its own settings' defaults, its lambda)."""
    return _resolve_defaults(TrainConfig(method=method_class(method_name).Config()))


def _resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Defaults that depend on other keys, resolved while the config is built (the one place): lambda follows the
    method unless the user set it."""
    if cfg.rollout.on_policy_prob is None:
        lam = method_class(cfg.method.name).default_on_policy_prob()
        cfg.rollout = dataclasses.replace(cfg.rollout, on_policy_prob=lam)
    return cfg


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
        cfg = _resolve_defaults(_build(TrainConfig, tree))
        _check(cfg)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
