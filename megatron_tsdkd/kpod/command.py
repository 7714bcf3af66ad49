"""``tsdkd-kpod-prepare`` / ``tools/kpod_prepare.py``: KPOD's offline, resumable preparation (kpod/prepare.py).

    python tools/kpod_prepare.py --data teacher.jsonl --student path/to/student --out outputs/kpod --epochs 4
    torchrun --nproc-per-node 2 tools/kpod_prepare.py ... --tp 2
"""
from __future__ import annotations

import argparse
from typing import Optional

from megatron_tsdkd.kpod.prepare import PrepareSettings, prepare
from megatron_tsdkd.kpod.token_weighting import WeightingConfig
from megatron_tsdkd.runtime import ParallelLayout, init_distributed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="KPOD offline preparation: steps, token weights, difficulties, clusters, schedule")
    p.add_argument("--data", required=True, help="JSONL with prompt and teacher response (rationale + answer step)")
    p.add_argument("--student", required=True, help="the student model (HF folder or megatron checkpoint)")
    p.add_argument("--out", required=True, help="folder for the artefacts (method.prepared_dir)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs; T = epochs / 2")
    p.add_argument("--beta-div", type=float, default=12.0)
    p.add_argument("--num-clusters", type=int, default=5)
    p.add_argument("--no-weights-in-difficulty", action="store_true")
    p.add_argument("--no-progression", action="store_true")
    p.add_argument("--no-diversity", action="store_true")
    p.add_argument("--weighting-steps", type=int, default=200, help="optimizer steps of the token-weighting module")
    p.add_argument("--alpha-m", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (pipeline is 1)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.epochs < 1:
        raise SystemExit(f"error: --epochs must be >= 1, got {args.epochs}")
    settings = PrepareSettings(args.data, args.student, args.out, epochs=args.epochs, beta_div=args.beta_div,
                               num_clusters=args.num_clusters, weights_in_difficulty=not args.no_weights_in_difficulty,
                               use_progression=not args.no_progression, use_diversity=not args.no_diversity,
                               weighting=WeightingConfig(steps=args.weighting_steps, alpha_m=args.alpha_m,
                                                         seed=args.seed), seed=args.seed)
    init_distributed(ParallelLayout(tensor=args.tp))
    prepare(settings)

