"""A study: named cells (overrides of one base training config) x seeds, evaluated on the same held-out tasks.

Why a file of its own: the grid is the experiment's definition, so it is written down (configs/study_*.yaml) and
validated before any training starts, and a re-run of the same file adds only what is missing. Every cell starts
from the base config's student with the base config's budget (steps, batch, lr); a cell changes only what its
overrides say. The ``student`` and ``teacher`` reference rows are the two models of the base config, evaluated as
they are: they give the gap a method can recover, (acc - student) / (teacher - student).

    base: configs/demo_cpu.yaml            # training config every cell starts from
    launcher: slurm/demo_cpu.sh            # one call per run: <launcher> <overrides...>, TSDKD_CONFIG=<base>
    seeds: [1, 2]
    tasks: {arithmetic: megatron_tsdkd/assets/demo/data/eval.jsonl}   # default: {heldout: the base's data.eval}
    eval_limit: 0                          # >0: score only the first N problems of each task (tests)
    cells:                                 # name -> overrides (key=value, as tsdkd-train takes them)
      gkd: [method.name=gkd]
    ablation:                              # optional: row label -> cell name (the paper's ablation table)
      GKD: gkd
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REFERENCES = ("student", "teacher")


class StudyError(ValueError):
    """A mistake in the study file; one line naming the key."""


@dataclass(frozen=True)
class Study:
    base: str
    launcher: str
    seeds: tuple[int, ...]
    cells: dict[str, tuple[str, ...]]
    tasks: dict[str, str] = field(default_factory=dict)
    ablation: dict[str, str] = field(default_factory=dict)
    eval_limit: int = 0
    path: str = ""

    def runs(self) -> list[tuple[str, int]]:
        """Every (cell, seed) training run: the first seed of every cell (in file order) first, so a study stopped
        early already has one value per cell, then the next seed of each."""
        return [(cell, seed) for seed in self.seeds for cell in self.cells]


def _need(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise StudyError(f"{where}: {key}: {message}")


def load_study(path: str) -> Study:
    """Read and check a study file; relative paths are kept as written (resolved against the working directory,
    the repository root, as the training configs' are)."""
    if not os.path.isfile(path):
        raise StudyError(f"{path}: study file not found")
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    _need(isinstance(tree, dict), path, "study", "the top level must be a mapping")
    known = {"base", "launcher", "seeds", "tasks", "cells", "ablation", "eval_limit"}
    unknown = sorted(set(tree) - known)
    _need(not unknown, path, unknown[0] if unknown else "", f"unknown key (known: {', '.join(sorted(known))})")
    base, launcher = tree.get("base", ""), tree.get("launcher", "")
    _need(isinstance(base, str) and os.path.isfile(base), path, "base", f"must name a training config file, got {base!r}")
    _need(isinstance(launcher, str) and os.path.isfile(launcher), path, "launcher",
          f"must name the launcher script every cell runs through, got {launcher!r}")
    seeds = tree.get("seeds", [1])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and len(set(seeds)) == len(seeds), path, "seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
    cells = tree.get("cells") or {}
    _need(isinstance(cells, dict) and cells, path, "cells", "must map cell names to lists of key=value overrides")
    for name, overrides in cells.items():
        _need(isinstance(name, str) and bool(NAME.match(name)) and name not in REFERENCES, path, f"cells.{name}",
              f"names are letters, digits, '_', '.', '-' and not {' or '.join(REFERENCES)}")
        _need(isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides), path,
              f"cells.{name}", f"must be a list of key=value strings, got {overrides!r}")
        reserved = [o for o in overrides if o.split("=", 1)[0].strip() in RUN_KEYS]
        _need(not reserved, path, f"cells.{name}", f"{reserved[0] if reserved else ''}: the study sets "
              f"{', '.join(RUN_KEYS)} itself (seeds: the seeds key)")
    tasks = tree.get("tasks") or {}
    _need(isinstance(tasks, dict) and all(isinstance(v, str) for v in tasks.values()), path, "tasks",
          "must map task names to JSONL files with answers")
    for name, task_path in tasks.items():
        _need(os.path.isfile(task_path), path, f"tasks.{name}", f"file not found: {task_path}")
    ablation = tree.get("ablation") or {}
    _need(isinstance(ablation, dict), path, "ablation", "must map row labels to cell names")
    for label, cell in ablation.items():
        _need(cell in cells, path, f"ablation.{label}", f"names no cell: {cell!r} (cells: {', '.join(cells)})")
    limit = tree.get("eval_limit", 0)
    _need(isinstance(limit, int) and limit >= 0, path, "eval_limit", f"must be an integer >= 0, got {limit!r}")
    return Study(base, launcher, tuple(seeds), {k: tuple(v) for k, v in cells.items()}, dict(tasks),
                 dict(ablation), limit, path)


# Keys every run gets from the study (its own output folders, its seed, no in-job evaluation): a cell may not set them.
RUN_KEYS = ("seed", "checkpoint.dir", "checkpoint.export_hf", "logging.dir", "data.eval")


def run_overrides(cell_overrides, seed: int, run_dir: str) -> list[str]:
    """The cell's overrides plus the run's own seed and folders. The job's before/after evaluation is switched off
    (data.eval=''): the study scores every exported student with tsdkd-eval on every task, the same way."""
    return [*cell_overrides, f"seed={seed}", f"checkpoint.dir={run_dir}/checkpoints",
            f"checkpoint.export_hf={run_dir}/student_hf", f"logging.dir={run_dir}/tensorboard", "data.eval="]
