"""The memory gate: the plan of a config for its engine (this module dispatches: megatron's in memory_plan.py,
DeepSpeed's in zero_memory_plan.py), with the node's host plan (host_memory_plan.py), ``batch.micro_size=auto``
resolved, and the refusal of a layout that cannot fit (``MemoryPlanError``: one sentence, then the table).
``tsdkd-plan`` and the run plan (run_plan.py) both come here.
"""
from __future__ import annotations

from typing import Optional

from megatron_tsdkd.models.hf_config import ArchSpec
from megatron_tsdkd.planning.host_memory_plan import NodeFacts, host_plan
from megatron_tsdkd.planning.memory_plan import (GIB, MemoryPlan, MemoryPlanError, as_spec, check_vllm_share,
                                                 inputs_from_config, plan_memory, suggest_layout, total_parameters)
from megatron_tsdkd.planning.zero_memory_plan import (plan_zero_memory, suggest_zero, zero_host_load_bytes,
                                                      zero_host_state_bytes, zero_settings)


def micro_batch_candidates(cfg, world_size: int) -> list[int]:
    """``batch.micro_size=auto``: the sizes it may take, largest first: those that divide a data-parallel rank's
    share of the global batch (with sequence ranking, multiples of ``rollout.num_samples``, whose candidates share
    a micro-batch)."""
    per_rank = cfg.batch.global_size // max(1, world_size // (cfg.parallel.tensor * cfg.parallel.pipeline))
    step = cfg.rollout.num_samples if getattr(cfg.method, "indirect_level", "token") == "sequence" else 1
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0 and b % step == 0] or [1]


def plan_for_config(cfg, world_size: int, student: ArchSpec, teacher: Optional[ArchSpec] = None,
                    gpu_memory_gib: Optional[float] = None, node: Optional[NodeFacts] = None,
                    vllm: Optional[bool] = None) -> tuple[MemoryPlan, str]:
    """The plan of a config for its engine (megatron: this module; deepspeed: planning/zero_memory_plan.py), with
    the host plan of ``node`` where it is known, and the suggestion to print when the device plan does not fit
    ("" when it does). With ``batch.micro_size=auto`` the plan of the largest micro-batch that fits (device and
    host), else of the smallest candidate; ``plan.inputs.micro_batch`` says which."""
    if cfg.batch.micro_size != "auto":
        return _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, None, vllm)
    for size in micro_batch_candidates(cfg, world_size):
        plan, suggestion = _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, size, vllm)
        if plan.fits and (plan.host is None or plan.host.fits):
            break
    return plan, suggestion


def _plan_for(cfg, world_size, student, teacher, gpu_memory_gib, node, micro_batch, vllm) -> tuple[MemoryPlan, str]:
    inputs = inputs_from_config(cfg, world_size, gpu_memory_gib, micro_batch, vllm)
    load_bytes, offloaded = None, 0
    if cfg.engine == "deepspeed":
        zero = zero_settings(cfg)
        plan = plan_zero_memory(student, teacher, inputs, zero)
        suggestion = "" if plan.fits else suggest_zero(student, teacher, inputs, zero)
        load_bytes = zero_host_load_bytes(student, teacher, inputs, zero)
        offloaded = zero_host_state_bytes(student, inputs, zero)
    else:
        plan = plan_memory(student, teacher, inputs)
        suggestion = "" if plan.fits else suggest_layout(student, teacher, inputs)
    if node is not None:
        plan.host = host_plan(
            plan.rows, node, student=student, student_parameters=total_parameters(student), dtype=inputs.dtype,
            padded_vocab=plan.padded_vocab, tp=inputs.tp, vllm=bool(inputs.vllm_memory_fraction),
            rollout_rows=max(1, inputs.global_batch // inputs.dp), rollout_len=inputs.rollout_len,
            async_save=cfg.checkpoint.async_save and cfg.engine == "megatron", load_bytes=load_bytes,
            offloaded_bytes=offloaded)
    return plan, suggestion


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
