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

from megatron_tsdkd.config import TrainConfig, teacher_layout_of, to_dict
from megatron_tsdkd.generation.vllm_replica import unsupported_reason
from megatron_tsdkd.methods import method_class
from megatron_tsdkd.models import ModelError, check_parallel_layout
from megatron_tsdkd.models.run_folder import CheckpointError, latest_checkpoint, step_of
from megatron_tsdkd.planning.host_memory_plan import node_facts
from megatron_tsdkd.planning.inputs import (PreflightError, RunInputs, check_inputs, launcher_ranks_per_node,
                                            launcher_world_size)
from megatron_tsdkd.planning.memory_gate import batch_split_problem, check_memory_plan
from megatron_tsdkd.planning.memory_plan import MemoryPlan
from megatron_tsdkd.planning.placement import Layout, placement_problem, rides_co_located
from megatron_tsdkd.planning.run_config import CONFIG_FILE, config_changes, describe, stored_config
from megatron_tsdkd.runtime.device_choices import device_memory_bytes

log = logging.getLogger("megatron_tsdkd.train")

# who samples the on-policy responses (rollout_backend): our KV-cached decode, student and teacher together
# (co-generation methods), a colocated vLLM replica per rank, transformers' generate (the DeepSpeed engine)
ROLLOUT_BACKENDS = ("megatron", "co-generation", "vllm", "hf")


@dataclass(frozen=True)
class RunPlan:
    engine: str                        # megatron | deepspeed
    layout: Layout                     # the student's (the teacher's too unless it has its own)
    micro_size: int                    # batch.micro_size, resolved when auto
    micro_batches: int                 # per optimizer step on each data-parallel rank
    prompts_per_step: int              # the sampler's global batch: batch.global_size / rollout.num_samples
    total_steps: int
    resume_folder: Optional[str]       # the checkpoint the run starts from, None for a fresh run
    rollout_backend: Optional[str]     # one of ROLLOUT_BACKENDS; None when the run never samples
    on_policy_prob: float              # lambda
    memory: MemoryPlan                 # the device plan (and the node's host plan) for this layout
    resume_step: int = 0               # the step of ``resume_folder`` (0 for a fresh run)
    # the teacher's layout when it runs on process groups of its own (engines/megatron/teacher_layout.py); None
    # when it is co-located in the student's pipeline stages (engines/megatron/colocation.py)
    teacher: Optional[Layout] = None

    @property
    def teacher_layout(self) -> Layout:
        """The teacher's layout: its own (parallel.teacher.*) or the student's."""
        return self.teacher or self.layout

    @property
    def teacher_has_own_layout(self) -> bool:
        """Whether the teacher runs on its own process groups and forward pass."""
        return self.teacher is not None

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
    tp, pp, ep = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert
    if world_size % (tp * pp * ep):
        sizes = (f"tensor x pipeline x expert = {tp} x {pp} x {ep}" if ep > 1 else f"tensor x pipeline = {tp} x {pp}")
        raise PreflightError(f"parallel: {sizes} = {tp * pp * ep} does not divide the {world_size} processes started "
                             f"(start a multiple of {tp * pp * ep}, e.g. torchrun --nproc-per-node {tp * pp * ep})")
    return Layout(tp, pp, world_size, expert=ep)


def teacher_layout(cfg: TrainConfig, student: Layout, teacher_spec, padded_vocab: int,
                   ranks_per_node: Optional[int] = None) -> Optional[Layout]:
    """The teacher's own layout from parallel.teacher.*, or None when it rides co-located in the student's
    (its layout, and parallel.teacher.colocated).

    The placement rule (placement.py ``placement_problem``): a teacher replica is ``tensor x pipeline`` consecutive
    ranks (tensor fastest, then pipeline), and it serves exactly the student replicas whose ranks it holds, so each
    must hold whole student replicas; its tensor-parallel group lies on one node. PreflightError names the key and
    the rule broken."""
    tp, pp = teacher_layout_of(cfg.parallel)
    ep = cfg.parallel.teacher.expert
    if rides_co_located(student, Layout(tp, pp, student.world_size, expert=ep), cfg.parallel.teacher.colocated,
                        teacher_spec.is_moe):
        return None
    problem = placement_problem(student, tp, pp, ranks_per_node, expert=ep)
    if problem:
        raise PreflightError(problem)
    try:
        check_parallel_layout(teacher_spec, tp, pp, padded_vocab=padded_vocab, ep=ep)
    except ModelError as error:
        raise PreflightError(f"parallel.teacher: {error}") from None
    return Layout(tp, pp, student.world_size, expert=ep)


def check_batch_layout(cfg: TrainConfig, dp: int, micro_size: int) -> int:
    """The micro-batches per step on each data-parallel rank; PreflightError naming the batch keys when the global
    batch does not split into data-parallel ranks x micro-batches, or a rank's share into whole prompts."""
    problem = batch_split_problem(cfg, dp, micro_size)   # memory_gate.py: the layout search asks it too
    if problem:
        raise PreflightError(problem)
    return cfg.batch.global_size // (dp * micro_size)


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
    nodes_ranks = ranks_per_node or launcher_ranks_per_node()
    teacher = (teacher_layout(cfg, lay, inputs.teacher.arch, inputs.tokens.padded_vocab_size, nodes_ranks)
               if inputs.teacher is not None and cfg.engine == "megatron" else None)
    check_batch_layout(cfg, lay.data_parallel, 1 if cfg.batch.micro_size == "auto" else cfg.batch.micro_size)
    check_optimizer(cfg)
    backend = rollout_backend(cfg, inputs)
    device_bytes = device_memory_bytes()   # None: a CPU run, whose models live in host memory
    node = node_facts(nodes_ranks or world, device_bytes is None,
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
                   resume_step=step_of(folder), teacher=teacher)
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
