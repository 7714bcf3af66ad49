"""``tsdkd-plan``: the per-rank GPU memory plan of a training config, with a verdict, before anything is queued;
with ``--host-memory-gib`` also the host memory of one node (its ``--gpus-per-node`` ranks).

    tsdkd-plan --config configs/tsdkd_70b_to_7b.yaml --world-size 16 --gpu-memory-gib 80 [key=value ...]
    tsdkd-plan --config configs/tsdkd_70b_to_7b.yaml --world-size 16 --host-memory-gib 1024
    tsdkd-plan --config configs/tsdkd_70b_to_7b.yaml --world-size 16 --gpu-memory-gib 80 --search

``--search`` lists every student (TP, PP) and teacher (TP, PP) of the world that splits both models, obeys the
placement rule (planning/placement.py) and fits, best first: the most student replicas, then the most headroom
(planning/layout_search.py); a mixture-of-experts model's expert parallelism (parallel.expert,
parallel.teacher.expert) is searched with them; exit 1 when none fits.

The world size comes from ``--world-size``, else ``--nodes`` x ``--gpus-per-node``, else the Slurm allocation; with
none of them the command stops instead of silently planning for one model-parallel group. Model configs come from
the model folders, or from configs/hf/<folder name>/ when the weights are not downloaded yet.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _world_size_from_env() -> Optional[int]:
    nodes, gpus = os.environ.get("SLURM_JOB_NUM_NODES"), os.environ.get("SLURM_GPUS_ON_NODE")
    if nodes and gpus:
        return int(nodes) * int(gpus)
    return None


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="tsdkd-plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tsdkd-train "
                                                     "(e.g. models.recompute=full)")
    parser.add_argument("--world-size", type=int, help="GPUs in the job (default: nodes x GPUs per node, or Slurm's)")
    parser.add_argument("--nodes", type=int, help="nodes in the job (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: memory.gpu_memory_gib)")
    parser.add_argument("--host-memory-gib", type=float,
                        help="host memory per node for the job: adds the node's host plan (default: "
                             "memory.host_memory_gib; unset: no host plan)")
    parser.add_argument("--student-config", help="HF folder or config.json (default: models.student.path)")
    parser.add_argument("--teacher-config", help="HF folder or config.json (default: models.teacher.path)")
    parser.add_argument("--search", action="store_true",
                        help="list the student and teacher layouts of the world that fit, best first, instead of "
                             "the config's plan")
    args = parser.parse_args(argv)

    from megatron_tsdkd.config import ConfigError, load_config
    from megatron_tsdkd.methods import method_class
    from megatron_tsdkd.planning.host_memory_plan import node_facts
    from megatron_tsdkd.planning.memory_plan import load_hf_spec
    from megatron_tsdkd.planning.layout_search import search_lines
    from megatron_tsdkd.planning.memory_gate import plan_for_config, search_for_config

    try:
        cfg = load_config(args.config, args.overrides)
        student, where_s = load_hf_spec(args.student_config or cfg.models.student.path, "student")
        teacher, where_t = (None, None)
        if method_class(cfg.method.name).needs_teacher:
            teacher, where_t = load_hf_spec(args.teacher_config or cfg.models.teacher.path, "teacher")
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(str(error))
    world = args.world_size or (args.nodes * args.gpus_per_node if args.nodes else None) or _world_size_from_env()
    if not world:
        _fail("--world-size: how many GPUs will the job have? pass --world-size N (or --nodes N --gpus-per-node G)")
    host = args.host_memory_gib or cfg.memory.host_memory_gib
    node = node_facts(min(world, args.gpus_per_node), False, host) if host else None
    per_node = min(world, args.gpus_per_node)
    if args.search and cfg.engine != "megatron":
        _fail("--search: lists engine=megatron layouts (engine=deepspeed has no tensor or pipeline parallelism)")
    print(f"student config: {where_s}")
    if teacher:
        print(f"teacher config: {where_t}")
    if args.search:
        choices, checked = search_for_config(cfg, world, student, teacher, args.gpu_memory_gib, node,
                                             ranks_per_node=per_node)
        gib = cfg.memory.gpu_memory_gib if args.gpu_memory_gib is None else args.gpu_memory_gib
        print("\n".join(search_lines(choices, world, per_node, checked, gib)))
        if choices:
            print(f"best: {' '.join(choices[0].overrides)}")
            return
        try:
            _, suggestion = plan_for_config(cfg, world, student, teacher, args.gpu_memory_gib, node,
                                            ranks_per_node=per_node)
        except ValueError:   # the config's own layout does not split this world: the table above says enough
            suggestion = ""
        if suggestion:
            print(f"suggestion: {suggestion}")
        raise SystemExit(1)
    try:
        plan, suggestion = plan_for_config(cfg, world, student, teacher, args.gpu_memory_gib, node,
                                           ranks_per_node=per_node)
    except ValueError as error:   # the plan's own errors name their key (parallel..., parallel.teacher...)
        _fail(str(error) if str(error).startswith("parallel") else f"parallel layout: {error}")
    print(plan.table())
    if not plan.fits:
        print(f"suggestion: {suggestion}")
    if plan.host is not None and not plan.host.fits:
        print(f"suggestion (host): {plan.host.advice(cfg.precision.dtype, False, cfg.engine)}")
    if not plan.fits or (plan.host is not None and not plan.host.fits):
        raise SystemExit(1)
