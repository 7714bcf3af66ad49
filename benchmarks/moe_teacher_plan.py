"""Mixture-of-experts teachers on 80 GB GPUs: the memory plan's per-GPU figures for the shipped Qwen3 pairs with the
teacher's experts split over its replicas (parallel.teacher.expert, the shipped layouts) against the same teacher
without expert parallelism, with their ratios, in one run; and each teacher's active share of its parameters (the
compute per token that a MoE teacher costs against a dense one of its size).

    .venv/bin/python benchmarks/moe_teacher_plan.py
    .venv/bin/python benchmarks/moe_teacher_plan.py --smoke     # the same (the plan is arithmetic): the suite's check

Model shapes come from configs/hf/ (no weights needed), the batch, sequence, rollout and layout settings from the
shipped configs (``batch.micro_size: auto``: each layout gets the largest micro-batch it fits). Nothing runs on a
GPU: these are the plan's figures (planning/memory_plan.py), the same the start-up gate checks.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.config import load_config  # noqa: E402
from megatron_tsdkd.planning.memory_gate import plan_for_config, with_layout  # noqa: E402
from megatron_tsdkd.planning.memory_plan import GIB, active_parameters, load_hf_spec, total_parameters  # noqa: E402
from megatron_tsdkd.planning.placement import Layout  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HF = os.path.join(ROOT, "configs", "hf")
# (config, teacher, student, world size); the shipped layout is the config's own
PAIRS = [("tsdkd_30b_a3b_to_1.7b.yaml", "Qwen3-30B-A3B", "Qwen3-1.7B", 8),
         ("tsdkd_235b_a22b_to_8b.yaml", "Qwen3-235B-A22B", "Qwen3-8B", 16)]


def row(name: str, plan) -> str:
    t = plan.inputs.teacher_layout
    layout = f"teacher TP={t.tensor} x PP={t.pipeline}, EP={t.expert}"
    return (f"  {name:<9}{layout:<30}{plan.inputs.dp:>9}{plan.inputs.micro_batch:>7}{max(plan.peaks) / GIB:>10.1f}"
            f"{plan.teacher_bytes / GIB:>10.1f}{plan.headroom / GIB:>10.1f}  {'fits' if plan.fits else 'does not fit'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--smoke", action="store_true", help="the same run: the plan takes milliseconds")
    args = parser.parse_args(argv)
    gib, per_node = args.gpu_memory_gib, args.gpus_per_node
    for config, teacher_name, student_name, world in PAIRS:
        cfg = load_config(os.path.join(ROOT, "configs", config), [])
        teacher = load_hf_spec(os.path.join(HF, teacher_name), "teacher")[0]
        student = load_hf_spec(os.path.join(HF, student_name), "student")[0]
        p = cfg.parallel
        s_layout = Layout(p.tensor, p.pipeline, world, expert=p.expert)
        t_layout = Layout(p.teacher.tensor, p.teacher.pipeline, world, expert=p.teacher.expert)

        def plan_at(t: Layout):
            return plan_for_config(with_layout(cfg, s_layout, t), world, student, teacher, gib,
                                   ranks_per_node=per_node)[0]

        shipped, unsplit = plan_at(t_layout), plan_at(Layout(t_layout.tensor, t_layout.pipeline, world))
        active, total = active_parameters(teacher), total_parameters(teacher)
        print(f"{teacher_name} -> {student_name}, {world} GPUs of {gib:g} GiB, configs/{config} (student TP={p.tensor}"
              f" x PP={p.pipeline}); the teacher: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
        print(f"  {'':<9}{'layout':<30}{'replicas':>9}{'micro':>7}{'peak GiB':>10}{'teacher':>10}{'headroom':>10}")
        print(row("shipped", shipped))
        print(row("no EP", unsplit))
        print(f"  shipped / no EP: teacher per GPU {shipped.teacher_bytes / unsplit.teacher_bytes:.3f}x, per-GPU "
              f"peak {max(shipped.peaks) / max(unsplit.peaks):.2f}x; active / total parameters "
              f"{active / total:.3f} (compute per token against a dense teacher of its size)")


if __name__ == "__main__":
    main()
