"""Where each model's ranks are, before any process group exists: the student's megatron rank order, a teacher
replica's block of consecutive ranks, and the placement rule that lets a teacher on a layout of its own
(``parallel.teacher.*``, engines/megatron/teacher_layout.py) serve whole student replicas.

Asked by the run plan (run_plan.py ``teacher_layout``, which refuses a layout that breaks the rule), by the memory
plan (which student and teacher pipeline stages share a GPU) and by the layout search (layout_search.py, which lists
only layouts that obey it): one statement of the rule for all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Layout:
    """Tensor x pipeline parallelism of one model; data parallelism fills the world; a mixture-of-experts model's
    experts are split over ``expert`` of its data-parallel replicas (each replica still runs its own tokens)."""
    tensor: int
    pipeline: int
    world_size: int
    expert: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)


def rides_co_located(student: Layout, teacher: Layout, colocated: bool, teacher_is_moe: bool) -> bool:
    """Whether the teacher rides in the student's pipeline stages (engines/megatron/colocation.py) rather than on
    process groups of its own: the same tensor x pipeline, parallel.teacher.colocated, and for a MoE teacher the
    student's expert split (co-located, it is built on the student's parallel_state, expert groups included)."""
    return ((teacher.tensor, teacher.pipeline) == (student.tensor, student.pipeline) and colocated
            and teacher.expert == (student.expert if teacher_is_moe else 1))


def student_replicas(student: Layout) -> list[list[int]]:
    """The ranks of each student model replica (its tensor x pipeline group), by data-parallel rank, in
    megatron-core's default rank order (tensor fastest, then data, then pipeline)."""
    tp, pp, dp = student.tensor, student.pipeline, student.data_parallel
    return [[t + tp * d + tp * dp * p for p in range(pp) for t in range(tp)] for d in range(dp)]


def placement_problem(student: Layout, tensor: int, pipeline: int,
                      ranks_per_node: Optional[int] = None, expert: int = 1) -> Optional[str]:
    """Why a teacher of ``tensor`` x ``pipeline`` on its own process groups cannot serve ``student``'s replicas (one
    sentence naming the key), or None. The placement rule: a teacher replica is ``tensor x pipeline`` consecutive
    ranks (tensor fastest, then pipeline) and serves exactly the student replicas whose ranks it holds, so each must
    hold whole student replicas; its tensor-parallel group lies on one node (``ranks_per_node``; None: not known);
    ``expert`` (a MoE teacher's expert parallelism) divides its data-parallel replicas."""
    world, size = student.world_size, tensor * pipeline
    if world % size:
        return (f"parallel.teacher: tensor x pipeline = {tensor} x {pipeline} = {size} does not divide the {world} "
                f"processes started")
    split = next((r for r in student_replicas(student) if len({rank // size for rank in r}) > 1), None)
    if split is not None:
        return (f"parallel.teacher: a teacher replica ({tensor} x {pipeline} = {size} consecutive ranks) must hold "
                f"whole student replicas (tensor {student.tensor} x pipeline {student.pipeline}), but the student "
                f"replica on ranks {split} spans two; make the teacher's tensor x pipeline a multiple of the student's"
                + (" holding every pipeline stage (e.g. the whole world)" if student.pipeline > 1 else ""))
    if (world // size) % expert:
        return (f"parallel.teacher.expert: {expert} must divide the teacher's {world // size} data-parallel replicas "
                f"(its experts are split over that many replicas of tensor x pipeline = {size} ranks)")
    if ranks_per_node and ranks_per_node % tensor:
        return (f"parallel.teacher.tensor: {tensor} must divide the {ranks_per_node} ranks on each node (a "
                f"tensor-parallel group never spans nodes)")
    return None


def replicas_served(student: Layout, teacher: Layout) -> int:
    """Student replicas per teacher replica (g): a teacher replica runs the micro-batches of all of them."""
    return teacher.tensor * teacher.pipeline // (student.tensor * student.pipeline)


def stage_pairs(student: Layout, teacher: Layout) -> list[tuple[int, int]]:
    """The kinds of GPU a world holds with the teacher on its own process groups, as (student pipeline stage,
    teacher pipeline stage) pairs, sorted: a GPU's memory depends on both. Student stage of rank r: r // (TP_s x
    DP_s) (megatron's order); teacher stage: its place in its replica's block, r mod (TP_t x PP_t) // TP_t.
    (Co-located, the teacher's stage is the student's.)"""
    per_stage, block = student.tensor * student.data_parallel, teacher.tensor * teacher.pipeline
    return sorted({(r // per_stage, r % block // teacher.tensor) for r in range(student.world_size)})
