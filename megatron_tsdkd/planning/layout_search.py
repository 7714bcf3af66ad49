"""The layout search (``tsdkd-plan --search``, and the start-up gate's suggestion when a layout does not fit): every
student (TP_s, PP_s) and teacher (TP_t, PP_t) of a world that splits both models evenly, obeys the placement rule
(placement.py) and fits the memory plan, best first. A mixture-of-experts model's expert parallelism is searched
too: powers of two dividing its experts and its data-parallel replicas (a MoE student at TP=1 only, as
planning/inputs.py requires of a trained MoE model).

Best means the most student data-parallel replicas (each trains its share of the batch at once: the step's
throughput), then the most headroom on the fullest GPU (``LayoutChoice.rank_key``; with ``batch.micro_size=auto``
first the largest micro-batch, which is what headroom buys). Tensor-parallel sizes divide a node's ranks (a group
across nodes is legal for the student but slow, so it is not listed). The teacher's layout equal to the student's
is the co-located special case; any other is a teacher on process groups of its own. How a layout is planned
(micro-batch, host memory) is the caller's: memory_gate.py plans it as it plans the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from megatron_tsdkd.models.hf_config import ArchSpec, ParallelLayoutError, check_parallel_layout
from megatron_tsdkd.planning.memory_plan import GIB, MemoryPlan
from megatron_tsdkd.planning.placement import Layout, placement_problem, replicas_served

GPUS_PER_NODE = 8   # a node's ranks where nothing says otherwise (tsdkd-plan's --gpus-per-node default)


@dataclass(frozen=True)
class LayoutChoice:
    """A layout that fits, and its plan."""
    student: Layout
    teacher: Layout          # the student's when co-located
    plan: MemoryPlan

    @property
    def co_located(self) -> bool:
        return not self.plan.teacher_has_own_layout

    @property
    def overrides(self) -> list[str]:
        """The config keys that select it (with a teacher all four: a config may hold a teacher layout of its own
        already; a MoE model's expert parallelism too)."""
        keys = [f"parallel.tensor={self.student.tensor}", f"parallel.pipeline={self.student.pipeline}"]
        if self.plan.student.is_moe:
            keys.append(f"parallel.expert={self.student.expert}")
        if self.plan.teacher is not None:
            keys += [f"parallel.teacher.tensor={self.teacher.tensor}",
                     f"parallel.teacher.pipeline={self.teacher.pipeline}"]
            if self.plan.teacher.is_moe:
                keys.append(f"parallel.teacher.expert={self.teacher.expert}")
        return keys

    def rank_key(self) -> tuple:
        """Best first: the most student replicas, then the largest micro-batch (``batch.micro_size=auto`` spends
        headroom on it; a fixed size is the same for all), then the most headroom in whole GiB; ties to fewer
        pipeline stages (the teacher's, then the student's: fewer bubbles and transfers), then to fewer ranks per
        replica, then to fewer ranks in an expert-parallel all-to-all."""
        s, t = self.student, self.teacher
        return (-s.data_parallel, -self.plan.inputs.micro_batch, -(self.plan.headroom // GIB), t.pipeline,
                s.pipeline, s.tensor * s.pipeline, t.tensor * t.pipeline, s.expert, t.expert)


def model_layouts(spec: ArchSpec, world: int, ranks_per_node: int, trained: bool = False) -> list[Layout]:
    """The (TP, PP) of ``world`` that split ``spec`` evenly (heads, KV heads, MLP, layers; the vocabulary is padded
    to fit, and checked again by the plan), TP dividing a node's ranks; for a MoE model each with every expert
    parallelism ``expert_sizes`` lists (``trained``: the student, which a MoE model is only at TP=1)."""
    out = []
    for tp in (t for t in range(1, ranks_per_node + 1) if ranks_per_node % t == 0 and world % t == 0):
        for pp in (p for p in range(1, world // tp + 1) if world // tp % p == 0):
            try:
                check_parallel_layout(spec, tp, pp, trained=trained)
            except ParallelLayoutError:
                continue
            out += [Layout(tp, pp, world, expert=ep) for ep in expert_sizes(spec, world // (tp * pp))]
    return out


def expert_sizes(spec: ArchSpec, replicas: int) -> list[int]:
    """The expert parallelisms to try for ``spec`` with ``replicas`` data-parallel replicas: the powers of two
    dividing both its experts and its replicas ([1] for a dense model)."""
    sizes = (2 ** k for k in range(replicas.bit_length()))
    return [e for e in sizes if replicas % e == 0 and spec.num_experts % e == 0] if spec.is_moe else [1]


def candidate_layouts(student: ArchSpec, teacher: Optional[ArchSpec], world: int,
                      ranks_per_node: int) -> list[tuple[Layout, Layout]]:
    """Every (student, teacher) layout pair of ``world`` that splits both models and obeys the placement rule
    (co-located pairs need none); without a teacher, the student's layouts paired with themselves."""
    pairs = []
    for s in model_layouts(student, world, ranks_per_node, trained=True):
        if teacher is None:
            pairs.append((s, s))
            continue
        for t in model_layouts(teacher, world, ranks_per_node):
            if t == s or placement_problem(s, t.tensor, t.pipeline, ranks_per_node, expert=t.expert) is None:
                pairs.append((s, t))
    return pairs


def search_layouts(pairs: Iterable[tuple[Layout, Layout]],
                   plan_of: Callable[[Layout, Layout], Optional[MemoryPlan]]) -> list[LayoutChoice]:
    """The pairs whose plan fits, best first. ``plan_of``: the fitting plan of a pair, or None (it does not fit, or
    the batch does not split over its replicas)."""
    fitting = []
    for s, t in pairs:
        plan = plan_of(s, t)
        if plan is not None:
            fitting.append(LayoutChoice(s, t, plan))
    return sorted(fitting, key=LayoutChoice.rank_key)


def search_lines(choices: list[LayoutChoice], world: int, ranks_per_node: int, checked: int,
                 gpu_memory_gib: float) -> list[str]:
    """The search as a table, best first."""
    lines = [f"layouts of {world} GPUs ({ranks_per_node} per node) that fit {gpu_memory_gib:g} GiB: {len(choices)} "
             f"of the {checked} that split both models and obey the placement rule; best first (most student "
             f"replicas, then the largest micro-batch, then the most headroom)",
             f"{'':>3}  {'student TP x PP':>15} {'DP':>3}   {'teacher TP x PP':>15} {'DP':>3}   {'teacher':<22}"
             f"{'micro-batch':>11} {'peak GiB':>9} {'headroom':>9}"]
    for n, c in enumerate(choices, 1):
        s, t, plan = c.student, c.teacher, c.plan
        g = replicas_served(s, t)
        where = "co-located" if c.co_located else f"own, serves {g} replica{'s' if g > 1 else ''}"
        teacher = f"{_sizes(t, plan.teacher):>15} {t.data_parallel:>3}   {where:<22}"
        if plan.teacher is None:
            teacher = f"{'-':>15} {'-':>3}   {'none':<22}"
        lines.append(f"{n:>3}  {_sizes(s, plan.student):>15} {s.data_parallel:>3}   {teacher}"
                     f"{plan.inputs.micro_batch:>11} {max(plan.peaks) / GIB:>9.1f} {plan.headroom / GIB:>9.1f}")
    return lines


def _sizes(layout: Layout, spec: Optional[ArchSpec]) -> str:
    """"TP x PP" of a layout, with a MoE model's expert parallelism ("1 x 1, EP 8")."""
    moe = spec is not None and spec.is_moe
    return f"{layout.tensor} x {layout.pipeline}" + (f", EP {layout.expert}" if moe else "")
