"""Cost of ``method.balance: shares``: the TSD-KD loss head, forward + backward, with and without the balance.

    .venv/bin/python benchmarks/term_balance_cost.py --tokens 2048 --vocab 32768
    .venv/bin/python benchmarks/term_balance_cost.py --smoke     # tiny sizes, a second: the suite's check

The balance measures the three terms' logit-gradient norms every micro-batch (one extra backward of the loss head
per term, losses/term_balance.py); the model's own forward and backward are untouched, so this is the whole extra
cost. Prints the median time of each variant over ``--repeats`` runs and their ratio, measured in one run, and the
extra seconds per micro-batch; with the loss head's share of a training step (``time/student_backward`` and
``time/step`` in the step's metrics) that gives the cost per step. Both variants see the same fp32 inputs; the
logging steps' diagnostics (which the balance makes free) are off in both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss  # noqa: E402
from megatron_tsdkd.losses.term_balance import TermBalance  # noqa: E402


def one_pass(student, teacher, mask, config, balance) -> float:
    logits = student.clone().requires_grad_()
    start = time.perf_counter()
    weigh = None if balance is None else balance.update
    tsdkd_loss(logits, teacher, mask, config, balance=weigh).loss.backward()
    return time.perf_counter() - start


SMOKE = dict(tokens=256, vocab=512, repeats=2)   # --smoke: tests/test_benchmarks.py keeps the script alive


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = parser.parse_args(argv)
    if args.smoke:   # explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    student = 2 * torch.randn(1, args.tokens, args.vocab, generator=gen)
    teacher = 2 * torch.randn(1, args.tokens, args.vocab, generator=gen)
    mask = torch.ones(1, args.tokens)
    mask[:, :64] = 0
    config = TSDKDLossConfig(chunk_size=512)
    times = {"none": [], "shares": []}
    for _ in range(args.repeats):   # interleaved, so a busy machine slows both alike
        times["none"].append(one_pass(student, teacher, mask, config, None))
        times["shares"].append(one_pass(student, teacher, mask, config, TermBalance((0.6, 0.2, 0.2), (True,) * 3,
                                                                                    0.9)))
    none, shares = statistics.median(times["none"]), statistics.median(times["shares"])
    print(f"loss head forward+backward, {args.tokens} tokens x {args.vocab} vocab, fp32, median of {args.repeats}:")
    print(f"  balance none   {none:.3f} s")
    print(f"  balance shares {shares:.3f} s   ratio {shares / none:.2f}x   extra {shares - none:.3f} s per micro-batch")


if __name__ == "__main__":
    main()
