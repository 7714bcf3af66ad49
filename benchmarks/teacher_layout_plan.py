"""Qwen2.5-72B -> 7B on 16 GPUs of 80 GB: the memory plan's per-GPU memory and student replicas under the layout the
shipped config had (both models co-located at TP=4 x PP=2) and under the one the layout search chooses (the student
and the teacher each on a layout of its own), with their ratios, in one run.

    .venv/bin/python benchmarks/teacher_layout_plan.py
    .venv/bin/python benchmarks/teacher_layout_plan.py --smoke     # the same (the plan is arithmetic): the suite's check

Model shapes come from configs/hf/ (no weights needed), the batch, sequence and rollout settings from
configs/tsdkd_70b_to_7b.yaml (``batch.micro_size: auto``: each layout gets the largest micro-batch it fits, and the
vLLM replica's share while it samples). Also printed: the teacher on one node (TP=8 x PP=1, the layout the issue
proposed), so the search's choice can be weighed against it. Nothing runs on a GPU: these are the plan's figures
(planning/memory_plan.py), the same the start-up gate checks.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.config import load_config  # noqa: E402
from megatron_tsdkd.planning.memory_gate import plan_for_config, search_for_config, with_layout  # noqa: E402
from megatron_tsdkd.planning.memory_plan import GIB, load_hf_spec  # noqa: E402
from megatron_tsdkd.planning.placement import Layout  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIG = os.path.join(ROOT, "configs", "tsdkd_70b_to_7b.yaml")
HF = os.path.join(ROOT, "configs", "hf")


def describe(plan) -> str:
    i = plan.inputs
    if not plan.teacher_has_own_layout:
        return f"co-located TP={i.tp} x PP={i.pp}"
    t = i.teacher_layout
    return f"student TP={i.tp} x PP={i.pp}, teacher TP={t.tensor} x PP={t.pipeline}"


def row(name: str, plan) -> str:
    return (f"{name:<9}{describe(plan):<40}{plan.inputs.dp:>9}{plan.inputs.micro_batch:>7}"
            f"{max(plan.peaks) / GIB:>10.1f}{plan.teacher_bytes / GIB:>10.1f}{plan.headroom / GIB:>10.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--smoke", action="store_true", help="the same run: the plan takes milliseconds")
    args = parser.parse_args(argv)
    world, per_node, gib = args.world_size, args.gpus_per_node, args.gpu_memory_gib
    student = load_hf_spec(os.path.join(HF, "Qwen2.5-7B-Instruct"), "student")[0]
    teacher = load_hf_spec(os.path.join(HF, "Qwen2.5-72B-Instruct"), "teacher")[0]
    cfg = load_config(CONFIG, [])

    def plan_at(s: Layout, t: Layout):
        plan, _ = plan_for_config(with_layout(cfg, s, t), world, student, teacher, gib, ranks_per_node=per_node)
        return plan

    today = plan_at(Layout(4, 2, world), Layout(4, 2, world))   # the shipped config before the teacher's own layout
    choices, checked = search_for_config(cfg, world, student, teacher, gib, ranks_per_node=per_node)
    chosen = choices[0].plan
    per_node_teacher = plan_at(choices[0].student, Layout(per_node, 1, world))
    print(f"Qwen2.5-72B -> Qwen2.5-7B, {world} GPUs of {gib:g} GiB ({per_node} per node), "
          f"{os.path.relpath(CONFIG, ROOT)}'s batch ({cfg.batch.global_size} sequences of {cfg.data.max_length} "
          f"tokens, micro-batch auto) and rollouts; the search kept {len(choices)} of {checked} layouts")
    print(f"{'':<9}{'layout':<40}{'replicas':>9}{'micro':>7}{'peak GiB':>10}{'teacher':>10}{'headroom':>10}")
    print(row("today", today))
    print(row("chosen", chosen))
    print(row("per node", per_node_teacher))
    print(f"('teacher': its weights and its re-sharded output layer on the fullest GPU, GiB; 'chosen': "
          f"tsdkd-plan --search's best, {' '.join(choices[0].overrides)})")
    for name, plan in (("chosen", chosen), ("per node", per_node_teacher)):
        print(f"{name} / today: student replicas {plan.inputs.dp / today.inputs.dp:.2f}x, per-GPU peak "
              f"{max(plan.peaks) / max(today.peaks):.2f}x, teacher per GPU "
              f"{plan.teacher_bytes / today.teacher_bytes:.2f}x, sequences per forward over the world "
              f"{plan.inputs.dp * plan.inputs.micro_batch / (today.inputs.dp * today.inputs.micro_batch):.2f}x")


if __name__ == "__main__":
    main()
