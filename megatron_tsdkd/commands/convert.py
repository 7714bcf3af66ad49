"""``tsdkd-convert``: Hugging Face folder <-> megatron-core distributed checkpoint (logic in models/convert.py).

    tsdkd-convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N] [--dtype bf16|fp16|fp32] [--force]
    tsdkd-convert mcore-to-hf --mcore DIR --out DIR [--tp N --pp N --ep N] [--dtype ...] [--force]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megatron_tsdkd.models.dtypes import DTYPE_NAMES, DTYPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsdkd-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron-core distributed checkpoint")
    to_mcore.add_argument("--hf", dest="source", required=True, help="Hugging Face model folder (config + safetensors)")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> Hugging Face folder")
    to_hf.add_argument("--mcore", dest="source", required=True,
                       help="checkpoint folder (or a training run folder with 'latest')")
    for p in (to_mcore, to_hf):
        p.add_argument("--out", required=True, help="target folder (must be empty or absent unless --force)")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the work (default 1)")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks doing the work (default 1)")
        p.add_argument("--ep", type=int, default=1,
                       help="expert-parallel ranks sharing a mixture-of-experts model's experts (default 1)")
        p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the source's dtype")
        p.add_argument("--force", action="store_true", help="replace a non-empty target folder")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    from megatron_tsdkd.models.convert import ModelError, prepare_conversion, run_world

    args = _parser().parse_args(argv)
    try:
        fn, fn_args = prepare_conversion(args.command, args.source, args.out, args.tp, args.pp,
                                         DTYPES[args.dtype] if args.dtype else None, args.force, args.ep)
        run_world(args.tp * args.pp * args.ep, fn, *fn_args)
    except (ModelError, OSError) as error:
        raise SystemExit(f"tsdkd-convert: error: {error}") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"tsdkd-convert: wrote {args.out}", file=sys.stderr)
