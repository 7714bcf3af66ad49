"""``tsdkd-train --config configs/X.yaml [key=value ...]``: validate the config and every input, then run the job
(training, optional before/after accuracy, HF export) in this process's rank of the launcher's world.

    tsdkd-train --config X.yaml [key=value ...] --print-config   the resolved config as YAML; nothing else is read
    tsdkd-train --config X.yaml [key=value ...] --dry-run        validate, preflight, memory plan; build nothing

``--dry-run`` checks what a launch would: the config, every input (check_inputs: models, tokenizer, data, output
folders, resume) and the memory plan, for the world the job would start (``WORLD_SIZE``, else the smallest world the
student's and the teacher's replicas fill). It starts no process group and builds no model, prints the start-up summary and the plan
table on stdout, and exits 0; or exits 2 with exactly one line ``error: ...`` on stderr (everything else it prints,
library warnings included, goes to stdout), so a launcher can run it before torchrun and show that line.

Every process calls ``runtime.warnings.install()`` first (torchrun starts this command in each worker), and logs
through Python logging: warnings and above from libraries, INFO from this project (rank 0's start-up summary and
its per-step text lines, see engines/metrics.py) to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, as every other user error (argparse would print the usage too)
        _fail(f"{message} (see tsdkd-train --help)")


def configure_logging(stream=None) -> None:
    """Library loggers at WARNING, this project's at INFO, on ``stream`` (default stderr)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", stream=stream)
    logging.getLogger("megatron_tsdkd").setLevel(logging.INFO)


def dry_run(cfg) -> None:
    """Everything a launch checks before its first collective, for the world it would start (``WORLD_SIZE`` and
    ``LOCAL_WORLD_SIZE`` as the launcher would set them, else the smallest world both models' replicas fill: the
    student's tensor x pipeline, and the teacher's when it has a layout of its own, on one node);
    prints the summary and the memory plan. Raises the same errors a launch would (PreflightError,
    MemoryPlanError, ...)."""
    from megatron_tsdkd.config import teacher_layout_of
    from megatron_tsdkd.engines.metrics import startup_summary
    from megatron_tsdkd.planning.run_plan import preflight

    teacher = teacher_layout_of(cfg.parallel)
    world = int(os.environ.get("WORLD_SIZE") or math.lcm(cfg.parallel.tensor * cfg.parallel.pipeline,
                                                          teacher[0] * teacher[1]))
    inputs, plan = preflight(cfg, world_size=world, ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE") or world))
    for line in startup_summary(cfg, inputs, plan, start_step=plan.resume_step):
        print(line)
    print(plan.memory.table())
    print(f"dry run: the config, the inputs and the memory plan for {world} processes are fine; nothing was built")


def main(argv=None) -> None:
    from megatron_tsdkd.runtime.warnings import install

    install()   # before megatron-core is imported: most of its warnings come at import
    parser = _Parser(prog="tsdkd-train", description="Distil a teacher into a student (TSD-KD and baselines).")
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.beta=0.5 parallel.tensor=2")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    mode.add_argument("--dry-run", action="store_true",
                      help="validate the config, check every input and plan the memory for the world it would run "
                           "at (WORLD_SIZE, else the smallest world the student's and teacher's replicas fill); build "
                           "nothing, exit 0 or 2")
    args = parser.parse_args(argv)
    from megatron_tsdkd.config import ConfigError, load_config

    if args.dry_run:
        _dry_run_main(args)
        return
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        _fail(str(error))
    if args.print_config:
        from megatron_tsdkd.planning.run_config import config_yaml

        print(config_yaml(cfg), end="")
        return
    from megatron_tsdkd.planning.inputs import PreflightError
    from megatron_tsdkd.planning.memory_plan import MemoryPlanError
    from megatron_tsdkd.planning.run_plan import preflight
    try:
        inputs, plan = preflight(cfg)
    except (PreflightError, MemoryPlanError) as error:
        first, *table = str(error).splitlines()
        if table:   # the memory plan's table, then the one-line error
            print("\n".join(table), flush=True)
        _fail(first)
    from megatron_tsdkd.engines.job import run_job
    from megatron_tsdkd.generation.vllm_rollouts import RolloutEngineError
    try:
        run_job(cfg, inputs, plan)
    except Exception as error:   # noqa: BLE001 - a peer's death is named as the cause; else as before
        _fail_if_a_peer_died(error)
        if isinstance(error, RolloutEngineError):   # a vLLM crash or out-of-memory: one line, the checkpoint stays
            _fail(str(error))
        raise


def _fail_if_a_peer_died(error: Exception) -> None:
    """One ``error:`` line naming the rank whose death (OOM killer, Slurm, a crash) caused ``error``, if one did
    (runtime/rank_deaths.py); returns otherwise. torchrun's SIGTERM to the survivors is held off meanwhile, and
    after the line too, so that this rank exits 2 rather than dying of it."""
    from megatron_tsdkd.runtime import rank_deaths

    previous = rank_deaths.hold_off_stop_signals()
    try:
        explained = rank_deaths.explain_failure(error)
    except Exception as failure:  # noqa: BLE001 - never hide the job's own error behind a failed explanation
        print(f"warning: could not look for a dead peer ({type(failure).__name__}: {failure})", file=sys.stderr)
        explained = None
    if explained:
        _fail(explained)
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _dry_run_main(args) -> None:
    """stderr carries nothing but the one error line: logging, warnings and prints all go to stdout."""
    from megatron_tsdkd.config import ConfigError, load_config
    from megatron_tsdkd.models.run_folder import CheckpointError

    configure_logging(sys.stdout)
    try:
        with contextlib.redirect_stderr(sys.stdout):
            dry_run(load_config(args.config, args.overrides))
    except (ConfigError, ValueError, CheckpointError, OSError) as error:  # PreflightError, MemoryPlanError: ValueErrors
        first, *rest = str(error).splitlines() or [type(error).__name__]
        if rest:   # the memory plan's table
            print("\n".join(rest))
        sys.stdout.flush()
        _fail(first)
