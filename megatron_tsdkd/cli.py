"""Console entry points: tsdkd-train, tsdkd-eval, tsdkd-convert, tsdkd-plan, tsdkd-data, tsdkd-doctor (also
``python -m megatron_tsdkd.cli X``). Each program lives in megatron_tsdkd/commands/; this module only dispatches."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "train", "eval": "eval", "convert": "convert", "plan": "plan", "teacher-data": "teacher_data",
            "data": "data", "doctor": "doctor"}


def _run(command: str, argv=None) -> None:
    if command == "doctor":   # before anything that imports torch: a torch that cannot load is one of its findings
        importlib.import_module("megatron_tsdkd.commands.doctor").main(argv)
        return
    from megatron_tsdkd.runtime.warnings import install

    install()   # before megatron-core is imported: most of its notes come at import
    importlib.import_module(f"megatron_tsdkd.commands.{COMMANDS[command]}").main(argv)


def train_main(argv=None) -> None:
    _run("train", argv)


def eval_main(argv=None) -> None:
    _run("eval", argv)


def convert_main(argv=None) -> None:
    _run("convert", argv)


def plan_main(argv=None) -> None:
    _run("plan", argv)


def data_main(argv=None) -> None:
    _run("data", argv)


def doctor_main(argv=None) -> None:
    _run("doctor", argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"error: usage: python -m megatron_tsdkd.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    _run(argv[0], argv[1:])


if __name__ == "__main__":
    main()
