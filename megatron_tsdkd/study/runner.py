"""Running a study: every (cell, seed) trains through the launcher the demo and the Slurm jobs use, the exported
student is scored with ``tsdkd-eval`` on every task, and the result is one JSON file per run.

Resumable by construction: a run whose ``result.json`` exists is never rerun (the file is written last, atomically,
so a killed run leaves none); an interrupted training resumes from its own checkpoints (checkpoint.resume=auto).
A cell whose method is not registered is reported ``missing`` and has no result, so re-running the same study
once the method exists trains exactly the runs still missing. A run that fails is reported ``failed`` with its log
and the study goes on. Config errors in any cell stop the study before anything runs.

Layout of the output folder:
    references/{student,teacher}/result.json     the base config's two models, untrained, scored like every run
    runs/<cell>-seed<S>/result.json              {"cell", "seed", "accuracy": {task: acc}, seconds, final scalars}
    runs/<cell>-seed<S>/train.log, eval-<task>.log, predictions-<task>.jsonl, student_hf/, checkpoints/, tensorboard/
    study.json, study.md (the tables), study.png (when matplotlib is installed)
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

from megatron_tsdkd.config import ConfigError, load_config
from megatron_tsdkd.methods import METHODS
from megatron_tsdkd.runtime.atomic_files import write_json_atomic
from megatron_tsdkd.study.spec import Study, StudyError, run_overrides

RESULT = "result.json"
# Variables of an enclosing launcher that would make a child think it is one rank of a bigger world.
LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID")


@dataclass(frozen=True)
class Run:
    cell: str
    seed: int
    overrides: tuple[str, ...]    # everything the launcher gets after the base config
    folder: str


@dataclass(frozen=True)
class EvalSettings:
    tasks: dict[str, str]         # task name -> JSONL with answers
    max_new_tokens: int           # the base config's rollout.max_new_tokens: what the job itself would decode
    max_prompt_length: int


def method_of(study: Study, overrides) -> str:
    """The method a cell trains: its method.name override, else the base config's."""
    for text in reversed(list(overrides)):
        key, value = text.split("=", 1)
        if key.strip() == "method.name":
            return str(yaml.safe_load(value))
    with open(study.base) as f:
        return str(((yaml.safe_load(f) or {}).get("method") or {}).get("name", "tsdkd"))


def plan_runs(study: Study, out_dir: str) -> tuple[list[Run], dict[str, str]]:
    """Every run with its full overrides, validated with the trainer's own config loader, and the status of cells
    that cannot run (``missing``: method not registered). Any other config error is a StudyError naming the cell."""
    # The base config's settings of other methods are ignored for each cell with a warning: once per cell, not here.
    logging.getLogger("megatron_tsdkd.config").setLevel(logging.ERROR)
    runs, status = [], {}
    for cell, seed in study.runs():
        if method_of(study, study.cells[cell]) not in METHODS:
            status[cell] = "missing"
            continue
        folder = os.path.join(out_dir, "runs", f"{cell}-seed{seed}")
        overrides = tuple(run_overrides(study.cells[cell], seed, folder))
        try:
            load_config(study.base, overrides)
        except ConfigError as error:
            raise StudyError(f"{study.path}: cells.{cell}: {error}") from None
        runs.append(Run(cell, seed, overrides, folder))
    return runs, status


def eval_settings(study: Study, out_dir: str) -> tuple[EvalSettings, dict[str, str]]:
    """The tasks (the base config's data.eval when the study names none; the first eval_limit problems of each
    when set) and the decoding budget, plus the base config's student and teacher paths."""
    cfg = load_config(study.base, ())
    tasks = dict(study.tasks) or ({"heldout": cfg.data.eval} if cfg.data.eval else {})
    if not tasks:
        raise StudyError(f"{study.path}: tasks: none given and {study.base} has no data.eval")
    if study.eval_limit:
        os.makedirs(os.path.join(out_dir, "tasks"), exist_ok=True)
        for name, path in list(tasks.items()):
            subset = os.path.join(out_dir, "tasks", f"{name}.jsonl")
            with open(path) as src, open(subset, "w") as dst:
                dst.writelines(line for _, line in zip(range(study.eval_limit), src))
            tasks[name] = subset
    models = {"student": cfg.models.student.path, "teacher": cfg.models.teacher.path}
    return EvalSettings(tasks, cfg.rollout.max_new_tokens, cfg.data.max_prompt_length), models


def child_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _call(command: list[str], log_path: str, env: dict) -> int:
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def evaluate(model: str, settings: EvalSettings, folder: str, python: str = sys.executable) -> dict[str, float]:
    """tsdkd-eval's JSONL path on every task, one process (TP=1); the accuracy is read from its predictions file
    (one line per problem with a ``correct`` flag), not from its printed text."""
    accuracy = {}
    for task, data in settings.tasks.items():
        predictions = os.path.join(folder, f"predictions-{task}.jsonl")
        command = [python, "-m", "megatron_tsdkd.cli", "eval", "--model", model, "--data", data,
                   "--max-new-tokens", str(settings.max_new_tokens),
                   "--max-prompt-length", str(settings.max_prompt_length), "--predictions", predictions]
        rc = _call(command, os.path.join(folder, f"eval-{task}.log"), child_env())
        if rc != 0 or not os.path.isfile(predictions):
            raise RuntimeError(f"tsdkd-eval failed on {task} (exit {rc}); see {folder}/eval-{task}.log")
        with open(predictions) as f:
            flags = [bool(json.loads(line)["correct"]) for line in f if line.strip()]
        accuracy[task] = sum(flags) / len(flags) if flags else 0.0
    return accuracy


def final_scalars(logdir: str) -> dict[str, float]:
    """The last value of every TensorBoard scalar of a run (loss terms, grad_share/*, ...); empty if unreadable."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    values = {}
    for root, _, files in os.walk(logdir):
        if not any(name.startswith("events.") for name in files):
            continue
        events = EventAccumulator(root, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            values[tag] = float(events.Scalars(tag)[-1].value)
    return values


class SubprocessRunner:
    """One launcher call per run (the same script and job code the demo uses), then tsdkd-eval of its export."""

    def __init__(self, study: Study, settings: EvalSettings, python: str = sys.executable):
        self.study, self.settings, self.python = study, settings, python

    def __call__(self, run: Run) -> dict:
        os.makedirs(run.folder, exist_ok=True)
        env = child_env({"TSDKD_CONFIG": self.study.base, "TSDKD_PYTHON": self.python,
                         "TSDKD_LOG_DIR": os.path.join(run.folder, "logs")})
        start = time.perf_counter()
        rc = _call([self.study.launcher, *run.overrides], os.path.join(run.folder, "train.log"), env)
        train_seconds = time.perf_counter() - start
        export = os.path.join(run.folder, "student_hf")
        if rc != 0 or not os.path.isfile(os.path.join(export, "config.json")):
            raise RuntimeError(f"training failed (exit {rc}); see {run.folder}/train.log")
        start = time.perf_counter()
        accuracy = evaluate(export, self.settings, run.folder, self.python)
        return {"accuracy": accuracy, "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(time.perf_counter() - start, 1),
                "final_scalars": final_scalars(os.path.join(run.folder, "tensorboard"))}


def read_result(folder: str) -> Optional[dict]:
    path = os.path.join(folder, RESULT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data) -> None:
    """Atomic (runtime/atomic_files.py): the file appears complete or not at all (it marks a run as finished)."""
    write_json_atomic(path, data, indent=2, sort_keys=True)


def reference_results(models: dict[str, str], settings: EvalSettings, out_dir: str,
                      evaluator: Callable[[str, EvalSettings, str], dict], progress=None) -> dict[str, dict]:
    """The untrained student and the teacher, each scored once (cached like a run)."""
    references = {}
    for name, model in models.items():
        folder = os.path.join(out_dir, "references", name)
        cached = read_result(folder)
        if cached is None:
            os.makedirs(folder, exist_ok=True)
            start = time.perf_counter()
            cached = {"model": model, "accuracy": evaluator(model, settings, folder),
                      "eval_seconds": round(time.perf_counter() - start, 1)}
            write_json(os.path.join(folder, RESULT), cached)
        if progress is not None:
            progress.update(1)
        references[name] = cached["accuracy"]
    return references


def run_all(runs: list[Run], runner: Optional[Callable[[Run], dict]], progress=None, say=print
            ) -> tuple[list[dict], dict]:
    """Run what has no result yet (``runner`` None: run nothing, those are ``pending``); return every finished
    result and the status of cells with runs that failed or are pending."""
    results, failed = [], {}
    for run in runs:
        result = read_result(run.folder)
        if result is not None and result.get("overrides") != list(run.overrides):
            say(f"{run.cell} seed {run.seed}: its result was trained with other overrides ({result.get('overrides')}); "
                f"kept; delete {run.folder} to rerun it")
        if result is None and runner is None:
            failed.setdefault(run.cell, "pending")
        elif result is None:
            if progress is not None:
                progress.set_postfix_str(f"{run.cell} seed {run.seed}")
            try:
                result = {"cell": run.cell, "seed": run.seed, "overrides": list(run.overrides), **runner(run)}
            except Exception as error:   # one failed run must not end the study; its log says why
                failed[run.cell] = "failed"
                say(f"{run.cell} seed {run.seed}: {error}")
                result = None
            else:
                write_json(os.path.join(run.folder, RESULT), result)
        if progress is not None:
            progress.update(1)
        if result is not None:
            results.append(result)
    return results, failed
