"""Console entry points: tsdkd-train, tsdkd-eval, tsdkd-convert, tsdkd-plan (also `python -m megatron_tsdkd.cli X`)."""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_tsdkd.config import ConfigError, load_config


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="tsdkd-train", description="Distil a teacher into a student (TSD-KD and baselines).")
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.beta=0.5 parallel.tensor=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        _fail(str(error))
    from megatron_tsdkd.training.setup import PreflightError, prepare
    try:
        setup = prepare(cfg)
    except PreflightError as error:
        _fail(str(error))
    from megatron_tsdkd.training.job import run_job
    run_job(cfg, setup)


def eval_main(argv=None) -> None:
    from megatron_tsdkd.eval.cli import main
    main(argv)


def convert_main(argv=None) -> None:
    from megatron_tsdkd.models.convert import main
    main(argv)


def plan_main(argv=None) -> None:
    from megatron_tsdkd.training.memory_plan import main
    main(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "convert": convert_main, "plan": plan_main}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _fail(f"usage: python -m megatron_tsdkd.cli {{{','.join(COMMANDS)}}} ...")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
