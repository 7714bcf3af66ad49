"""The run plan: every fact derived from the config and the inputs, computed once before any process group exists
and frozen. Downstream (the engines, the step, the summary, the dry run) reads it; nothing re-derives a fact or
changes the config.

One function per fact: ``layout`` (TP / PP / DP of the world), ``check_batch_layout`` (the micro-batch divisibility
rules), ``total_steps``, ``resume_folder`` (checkpoint.resume: none / auto / a folder), ``rollout_backend`` (who
samples on-policy responses), and the memory plan (planning/memory_gate.py), which also resolves
``batch.micro_size=auto``. ``plan_run`` puts them together; ``preflight`` is the inputs' check plus the plan, what
a launch and ``tsdkd-train --dry-run`` run (the dry run for a stated world size, without touching the environment).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.config import TrainConfig, to_dict
from megatron_tsdkd.generation.vllm_replica import unsupported_reason
from megatron_tsdkd.methods import method_class
from megatron_tsdkd.models.run_folder import CheckpointError, latest_checkpoint, step_of
from megatron_tsdkd.planning.host_memory_plan import node_facts
from megatron_tsdkd.planning.inputs import (PreflightError, RunInputs, check_inputs, launcher_ranks_per_node,
                                            launcher_world_size)
from megatron_tsdkd.planning.memory_gate import check_memory_plan
from megatron_tsdkd.planning.memory_plan import MemoryPlan
from megatron_tsdkd.planning.run_config import CONFIG_FILE, config_changes, describe, stored_config
from megatron_tsdkd.runtime.device_choices import device_memory_bytes

log = logging.getLogger("megatron_tsdkd.train")

# who samples the on-policy responses (rollout_backend): our KV-cached decode, student and teacher together
# (co-generation methods), a colocated vLLM replica per rank, transformers' generate (the DeepSpeed engine)
ROLLOUT_BACKENDS = ("megatron", "co-generation", "vllm", "hf")


@dataclass(frozen=True)
class Layout:
    """Tensor x pipeline parallelism of one model; data parallelism fills the world."""
    tensor: int
    pipeline: int
    world_size: int

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)


@dataclass(frozen=True)
class RunPlan:
    engine: str                        # megatron | deepspeed
    layout: Layout                     # the student's (and, today, the teacher's)
    micro_size: int                    # batch.micro_size, resolved when auto
    micro_batches: int                 # per optimizer step on each data-parallel rank
    prompts_per_step: int              # the sampler's global batch: batch.global_size / rollout.num_samples
    total_steps: int
    resume_folder: Optional[str]       # the checkpoint the run starts from, None for a fresh run
    rollout_backend: Optional[str]     # one of ROLLOUT_BACKENDS; None when the run never samples
    on_policy_prob: float              # lambda
    memory: MemoryPlan                 # the device plan (and the node's host plan) for this layout
    resume_step: int = 0               # the step of ``resume_folder`` (0 for a fresh run)

    @property
    def teacher_layout(self) -> Layout:
        """The teacher's layout: the student's today (both share one megatron parallel_state)."""
        return self.layout

    @property
    def rows_per_rank(self) -> int:
        """Sequences per optimizer step on each data-parallel rank."""
        return self.micro_size * self.micro_batches

    def resolved_config(self, cfg: TrainConfig) -> TrainConfig:
        """A copy of ``cfg`` with what the plan resolved written in (rollout.engine, batch.micro_size): what a
        checkpoint stores and a resumed run compares against. ``cfg`` itself is not changed."""
        engine = cfg.rollout.engine
        if engine == "auto":
            engine = "vllm" if self.rollout_backend == "vllm" else "megatron"
        return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine=engine),
                                   batch=dataclasses.replace(cfg.batch, micro_size=self.micro_size))


# ---------------------------------------------------------------------------------------------------------------
# One function per derived fact


def layout(cfg: TrainConfig, world_size: int) -> Layout:
    """The student's layout in a world of ``world_size`` processes; PreflightError when TP x PP does not divide it."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world_size % (tp * pp):
        raise PreflightError(f"parallel: tensor x pipeline = {tp} x {pp} = {tp * pp} does not divide the {world_size} "
                             f"processes started (start a multiple of {tp * pp}, e.g. torchrun --nproc-per-node "
                             f"{tp * pp})")
    return Layout(tp, pp, world_size)


def check_batch_layout(cfg: TrainConfig, dp: int, micro_size: int) -> int:
    """The micro-batches per step on each data-parallel rank; PreflightError naming the batch keys when the global
    batch does not split into data-parallel ranks x micro-batches, or a rank's share into whole prompts."""
    b = cfg.batch
    if b.global_size % (dp * micro_size):
        raise PreflightError(f"batch.global_size: {b.global_size} is not a multiple of data-parallel size {dp} x "
                             f"batch.micro_size {micro_size}")
    if (b.global_size // dp) % cfg.rollout.num_samples:
        raise PreflightError(f"rollout.num_samples ({cfg.rollout.num_samples}) must divide the per-rank batch "
                             f"({b.global_size // dp} sequences)")
    return b.global_size // (dp * micro_size)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    """schedule.max_steps, else epochs x the global batches an epoch of ``num_examples`` holds."""
    prompts = cfg.batch.global_size // cfg.rollout.num_samples
    return cfg.schedule.max_steps or cfg.schedule.epochs * (num_examples // prompts)


def resume_folder(cfg: TrainConfig) -> Optional[str]:
    """checkpoint.resume: none starts afresh, auto takes the newest complete checkpoint in checkpoint.dir (if any),
    anything else names a checkpoint folder."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    try:
        folder = latest_checkpoint(cfg.checkpoint.dir) if resume == "auto" else resume
    except CheckpointError as error:
        raise PreflightError(f"checkpoint.dir: {error}") from None
    if folder is not None and not os.path.isdir(folder):
        raise PreflightError(f"checkpoint.resume: {folder} is not a folder")
    return folder


def rollout_backend(cfg: TrainConfig, inputs: RunInputs) -> Optional[str]:
    """Who samples the on-policy responses, decided once: None when the run never samples; co-generation for the
    methods that pick each token from both models; vLLM for rollout.engine=vllm (refused before start when vLLM
    cannot serve the student) or auto where it can; else our decode (megatron) or transformers' generate (the
    DeepSpeed engine, which has no megatron model)."""
    r = cfg.rollout
    if not r.on_policy_prob:
        return None
    if method_class(cfg.method.name).co_generation:
        return "co-generation"
    plain = "hf" if cfg.engine == "deepspeed" else "megatron"
    if r.engine == "megatron":
        return plain
    reason = unsupported_reason(inputs.student.hf_config)
    if reason and r.engine == "vllm":
        raise PreflightError(f"rollout.engine: vllm cannot sample the student {inputs.student.path}: {reason}; "
                             f"set rollout.engine=megatron (or auto)")
    return plain if reason else "vllm"


def check_optimizer(cfg: TrainConfig) -> None:
    """The megatron engine's optimizer must be one our checkpoints handle. megatron-core takes Transformer Engine's
    FusedAdam where TE imports, else Apex's, else torch's AdamW (megatron/core/optimizer/__init__.py); the fused ones
    keep Adam's step per parameter group, not per parameter, so engines/megatron/optim.py's ``adam_step`` /
    ``set_adam_step`` would save 0 and restore nothing: a resumed run would restart Adam's bias correction. Only
    torch's AdamW is tested (no GPU check has run TE), so the others are refused before start."""
    if cfg.engine != "megatron":
        return
    # deferred: megatron-core's optimizer module takes ~1.8 s to import, which tsdkd-plan and the DeepSpeed engine's
    # preflight do not need
    import megatron.core.optimizer as megatron_optimizer

    if getattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", True):
        return
    chosen = megatron_optimizer.Adam
    raise PreflightError(f"optimizer: megatron-core would build {chosen.__module__}.{chosen.__name__} (Transformer "
                         f"Engine or Apex is installed), whose Adam state this project's checkpoints do not handle "
                         f"(engines/megatron/optim.py: a resumed run would lose Adam's step count); train in an "
                         f"environment without them (pip uninstall transformer-engine apex), as `pip install -e .` "
                         f"sets it up")


def check_resume(cfg: TrainConfig, folder: Optional[str]) -> None:
    """A resumed run whose config changed what decides the numbers stops here, naming the keys (``cfg``: the
    resolved config, as the checkpoint stored it)."""
    if folder is None:
        return
    stored = stored_config(folder)
    quiet = os.environ.get("RANK", "0") != "0"   # every process checks; one says so
    say = (lambda *a: None) if quiet else log.warning
    if stored is None:
        say("resuming from %s, which holds no %s: the config cannot be compared", folder, CONFIG_FILE)
        return
    current = to_dict(cfg)
    breaking, harmless = config_changes(stored, current)
    if breaking and not cfg.checkpoint.allow_config_changes:
        raise PreflightError(f"checkpoint.resume: {folder} was trained with other settings, so resuming would not "
                             f"continue that run exactly: {describe(breaking, stored, current)}; restore them, or "
                             f"set checkpoint.allow_config_changes=true to continue with the new values")
    if breaking:
        say("resuming %s with changed settings (checkpoint.allow_config_changes): %s", folder,
            describe(breaking, stored, current))
    if harmless:
        say("resuming %s; changed settings that do not affect the numbers: %s", folder,
            describe(harmless, stored, current))


# ---------------------------------------------------------------------------------------------------------------
# The plan


def plan_run(cfg: TrainConfig, inputs: RunInputs, world_size: Optional[int] = None,
             ranks_per_node: Optional[int] = None) -> RunPlan:
    """The run plan of ``cfg`` with its checked ``inputs`` for ``world_size`` processes (default: the launcher's),
    ``ranks_per_node`` of them on each node (default: the launcher's). Raises PreflightError or MemoryPlanError
    (one sentence, the plan's table after it) for a run that cannot start."""
    world = world_size or launcher_world_size()
    lay = layout(cfg, world)
    check_batch_layout(cfg, lay.data_parallel, 1 if cfg.batch.micro_size == "auto" else cfg.batch.micro_size)
    check_optimizer(cfg)
    backend = rollout_backend(cfg, inputs)
    device_bytes = device_memory_bytes()   # None: a CPU run, whose models live in host memory
    node = node_facts(ranks_per_node or launcher_ranks_per_node() or world, device_bytes is None,
                      cfg.memory.host_memory_gib)
    memory = check_memory_plan(cfg, world, inputs.student.hf_config,
                               inputs.teacher.hf_config if inputs.teacher is not None else None, device_bytes, node,
                               vllm=backend == "vllm")
    micro = memory.inputs.micro_batch
    folder = resume_folder(cfg)
    plan = RunPlan(engine=cfg.engine, layout=lay, micro_size=micro,
                   micro_batches=check_batch_layout(cfg, lay.data_parallel, micro),
                   prompts_per_step=cfg.batch.global_size // cfg.rollout.num_samples,
                   total_steps=total_steps(cfg, len(inputs.train)), resume_folder=folder,
                   rollout_backend=backend, on_policy_prob=cfg.rollout.on_policy_prob, memory=memory,
                   resume_step=step_of(folder))
    check_resume(plan.resolved_config(cfg), folder)
    if cfg.batch.micro_size == "auto" and os.environ.get("RANK", "0") == "0":
        log.info("batch.micro_size=auto: %d, the largest micro-batch the memory plan fits (%s)", micro,
                 memory.verdict().removeprefix("verdict: "))
    return plan


def preflight(cfg: TrainConfig, world_size: Optional[int] = None,
              ranks_per_node: Optional[int] = None) -> tuple[RunInputs, RunPlan]:
    """Every check a launch makes before its first collective: the inputs, then the run plan."""
    inputs = check_inputs(cfg)
    return inputs, plan_run(cfg, inputs, world_size, ranks_per_node)
