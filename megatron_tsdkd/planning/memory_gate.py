"""The memory gate: the plan of a config for its engine (this module dispatches: megatron's in memory_plan.py,
DeepSpeed's in zero_memory_plan.py), with the node's host plan (host_memory_plan.py), ``batch.micro_size=auto``
resolved, and the refusal of a layout that cannot fit (``MemoryPlanError``: one sentence naming the best layout
that does, from the layout search, then the table). ``tsdkd-plan`` (with ``--search`` too) and the run plan
(run_plan.py) both come here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_tsdkd.models.hf_config import ArchSpec
from megatron_tsdkd.planning.host_memory_plan import NodeFacts, host_plan
from megatron_tsdkd.planning.layout_search import (GPUS_PER_NODE, LayoutChoice, candidate_layouts,
                                                   search_layouts)
from megatron_tsdkd.planning.memory_plan import (GIB, MemoryPlan, MemoryPlanError, as_spec, check_vllm_share,
                                                 inputs_from_config, plan_memory, suggest_layout, total_parameters)
from megatron_tsdkd.planning.placement import Layout
from megatron_tsdkd.planning.zero_memory_plan import (plan_zero_memory, suggest_zero, zero_host_load_bytes,
                                                      zero_host_state_bytes, zero_settings)


def batch_split_problem(cfg, dp: int, micro_size: int) -> Optional[str]:
    """Why the global batch does not split into ``dp`` data-parallel ranks x micro-batches of ``micro_size``, or a
    rank's share into whole prompts (one sentence naming the key), or None."""
    b = cfg.batch
    if b.global_size % (dp * micro_size):
        return (f"batch.global_size: {b.global_size} is not a multiple of data-parallel size {dp} x batch.micro_size "
                f"{micro_size}")
    if (b.global_size // dp) % cfg.rollout.num_samples:
        return (f"rollout.num_samples ({cfg.rollout.num_samples}) must divide the per-rank batch "
                f"({b.global_size // dp} sequences)")
    return None


def micro_batch_candidates(cfg, world_size: int) -> list[int]:
    """``batch.micro_size=auto``: the sizes it may take, largest first: those that divide a data-parallel rank's
    share of the global batch (with sequence ranking, multiples of ``rollout.num_samples``, whose candidates share
    a micro-batch)."""
    per_rank = cfg.batch.global_size // max(1, world_size // (cfg.parallel.tensor * cfg.parallel.pipeline))
    step = cfg.rollout.num_samples if getattr(cfg.method, "indirect_level", "token") == "sequence" else 1
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0 and b % step == 0] or [1]


def plan_for_config(cfg, world_size: int, student: ArchSpec, teacher: Optional[ArchSpec] = None,
                    gpu_memory_gib: Optional[float] = None, node: Optional[NodeFacts] = None,
                    vllm: Optional[bool] = None, ranks_per_node: Optional[int] = None) -> tuple[MemoryPlan, str]:
    """The plan of a config for its engine (megatron: this module; deepspeed: planning/zero_memory_plan.py), with
    the host plan of ``node`` where it is known, and the suggestion to print when the device plan does not fit
    ("" when it does; megatron: the best layout the search finds, layout_search.py, for ``ranks_per_node`` ranks on
    a node, default the node's). With ``batch.micro_size=auto`` the plan of the largest micro-batch that fits
    (device and host), else of the smallest candidate; ``plan.inputs.micro_batch`` says which."""
    plan = _fitting_plan(cfg, world_size, student, teacher, gpu_memory_gib, node, vllm)
    if plan.fits:
        return plan, ""
    if cfg.engine == "deepspeed":
        return plan, suggest_zero(student, teacher, plan.inputs, zero_settings(cfg))
    choices, _ = search_for_config(cfg, world_size, student, teacher, gpu_memory_gib, node, vllm, ranks_per_node)
    if not choices:
        return plan, suggest_layout(student, teacher, plan.inputs)
    best = choices[0]
    return plan, (f"try {' '.join(best.overrides)} (student DP={best.student.data_parallel}, peak "
                  f"{max(best.plan.peaks) / GIB:.1f} GiB at world size {world_size}; tsdkd-plan --search lists every "
                  f"layout that fits)")


def search_for_config(cfg, world_size: int, student: ArchSpec, teacher: Optional[ArchSpec] = None,
                      gpu_memory_gib: Optional[float] = None, node: Optional[NodeFacts] = None,
                      vllm: Optional[bool] = None, ranks_per_node: Optional[int] = None
                      ) -> tuple[list[LayoutChoice], int]:
    """The megatron layouts of ``world_size`` that fit, best first (layout_search.py), each planned as the gate plans
    the config at that layout (``batch.micro_size=auto`` resolved for each; the host too where ``node`` is known),
    with how many layouts were planned. Layouts over whose replicas the global batch does not split are left out."""
    per_node = ranks_per_node or (node.ranks if node is not None else min(world_size, GPUS_PER_NODE))

    def plan_of(s: Layout, t: Layout) -> Optional[MemoryPlan]:
        variant = with_layout(cfg, s, t)
        micro = micro_batch_candidates(variant, world_size)[-1] if cfg.batch.micro_size == "auto" \
            else cfg.batch.micro_size
        if batch_split_problem(variant, s.data_parallel, micro):
            return None
        try:
            plan = _fitting_plan(variant, world_size, student, teacher, gpu_memory_gib, node, vllm)
        except ValueError:   # the padded vocabulary does not split, or parallel.teacher.colocated=false puts a
            return None      # same-layout teacher on groups of its own that break the placement rule
        return plan if plan.fits and (plan.host is None or plan.host.fits) else None

    pairs = candidate_layouts(student, teacher, world_size, per_node)
    return search_layouts(pairs, plan_of), len(pairs)


def with_layout(cfg, student: Layout, teacher: Layout):
    """A copy of ``cfg`` at the student's and the teacher's (tensor, pipeline, expert) (``cfg`` is not changed)."""
    p = cfg.parallel
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        p, tensor=student.tensor, pipeline=student.pipeline, expert=student.expert,
        teacher=dataclasses.replace(p.teacher, tensor=teacher.tensor, pipeline=teacher.pipeline,
                                    expert=teacher.expert)))


def _fitting_plan(cfg, world_size, student, teacher, gpu_memory_gib, node, vllm) -> MemoryPlan:
    """The config's plan; with ``batch.micro_size=auto`` that of the largest micro-batch that fits (else the
    smallest's)."""
    if cfg.batch.micro_size != "auto":
        return _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, None, vllm)
    for size in micro_batch_candidates(cfg, world_size):
        plan = _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, size, vllm)
        if plan.fits and (plan.host is None or plan.host.fits):
            break
    return plan


def _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, micro_batch, vllm) -> MemoryPlan:
    inputs = inputs_from_config(cfg, world_size, gpu_memory_gib, micro_batch, vllm)
    load_bytes, offloaded = None, 0
    if cfg.engine == "deepspeed":
        zero = zero_settings(cfg)
        plan = plan_zero_memory(student, teacher, inputs, zero)
        load_bytes = zero_host_load_bytes(student, teacher, inputs, zero)
        offloaded = zero_host_state_bytes(student, inputs, zero)
    else:
        plan = plan_memory(student, teacher, inputs)
    if node is not None:
        plan.host = host_plan(
            plan.rows, node, student=student, student_parameters=total_parameters(student), dtype=inputs.dtype,
            padded_vocab=plan.padded_vocab, tp=inputs.tp, vllm=bool(inputs.vllm_memory_fraction),
            rollout_rows=max(1, inputs.global_batch // inputs.dp), rollout_len=inputs.rollout_len,
            async_save=cfg.checkpoint.async_save and cfg.engine == "megatron", load_bytes=load_bytes,
            offloaded_bytes=offloaded)
    return plan


def check_memory_plan(cfg, world_size: int, student_config, teacher_config=None,
                      gpu_memory_bytes: Optional[int] = None, node: Optional[NodeFacts] = None,
                      vllm: Optional[bool] = None) -> MemoryPlan:
    """The trainer's gate, before any model is built: raise MemoryPlanError (table + suggestion) when the layout
    cannot fit, on the GPU or in the host memory of ``node``, and ``memory.enforce`` is true; return the plan
    otherwise. ``gpu_memory_bytes`` is the device's real size on GPU (else ``memory.gpu_memory_gib``)."""
    student = as_spec(student_config)
    teacher = as_spec(teacher_config) if teacher_config is not None else None
    gib = gpu_memory_bytes / GIB if gpu_memory_bytes else None
    plan, suggestion = plan_for_config(cfg, world_size, student, teacher, gib, node, vllm)
    too_small = check_vllm_share(student, plan.inputs)
    if too_small and cfg.memory.enforce:
        raise MemoryPlanError(too_small)
    if not plan.fits and cfg.memory.enforce:
        raise MemoryPlanError(
            f"parallel layout: the planned memory per GPU exceeds {plan.inputs.gpu_memory_gib:.0f} GiB; "
            f"{suggestion}, or set memory.enforce=false to try anyway.\n{plan.table()}")
    host = plan.host
    if host is not None and not host.fits and cfg.memory.enforce:
        raise MemoryPlanError(
            f"host memory: {host.ranks} rank{'s' if host.ranks != 1 else ''} on this node need "
            f"{host.total / GIB:.1f} GiB "
            f"({host.per_rank / GIB:.1f} GiB each) but {host.available / GIB:.1f} GiB is available ({host.source}); "
            f"try {host.advice(plan.inputs.dtype, bool(plan.inputs.vllm_memory_fraction), cfg.engine)}, "
            f"or set memory.enforce=false to try anyway.\n{plan.table()}")
    return plan
