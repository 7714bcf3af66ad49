"""Peak memory and time of the full TSD-KD loss, forward + backward: chunked vocab-parallel vs. dense PyTorch.

    .venv/bin/python benchmarks/loss_memory.py --tokens 4096 --vocab 152064
    .venv/bin/python benchmarks/loss_memory.py --smoke      # tiny sizes, seconds: the suite's check

Each variant runs in its own subprocess on the same bf16 inputs (student with requires_grad, teacher without). The
peak is the growth of the process's peak resident set (getrusage ru_maxrss) over its value once the inputs exist,
so the bf16 inputs are excluded and the bf16 student gradient, which both variants produce, is included. Inputs are
filled row-chunk by row-chunk so that making them leaves no fp32 spike in the baseline. The dense variant is what
TRL-style code does: upcast the whole [tokens, V] logits, log_softmax, a stacked logsumexp for the JSD mixture,
autograd through all of it. The machine is shared: run the full size once; use --tokens to shrink.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.losses import TSDKDLossConfig, plackett_luce_nll, tsdkd_loss  # noqa: E402
from megatron_tsdkd.losses.tsdkd import opener_selection, teacher_ordered, top_entropy_selection  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_inputs(tokens: int, vocab: int, seed: int = 0):
    """bf16 logits [1, tokens, vocab] for both models and a mask with a 64-token prompt, built without fp32 spikes."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.empty(1, tokens, vocab, dtype=torch.bfloat16)
    teacher = torch.empty(1, tokens, vocab, dtype=torch.bfloat16)
    for lo in range(0, tokens, 64):
        hi = min(tokens, lo + 64)
        student[0, lo:hi] = (3 * torch.randn(hi - lo, vocab, generator=gen)).to(torch.bfloat16)
        teacher[0, lo:hi] = (3 * torch.randn(hi - lo, vocab, generator=gen)).to(torch.bfloat16)
    mask = torch.ones(1, tokens)
    mask[0, : min(64, tokens // 8)] = 0
    return student.requires_grad_(), teacher, mask


def dense_tsdkd(student, teacher, mask, cfg: TSDKDLossConfig) -> torch.Tensor:
    """Straightforward dense TSD-KD, the way a TRL GKDTrainer subclass computes it."""
    s = student.float() / cfg.temperature
    with torch.no_grad():
        t = teacher.float() / cfg.temperature
        log_t = F.log_softmax(t, dim=-1)
    log_s = F.log_softmax(s, dim=-1)
    beta = torch.tensor(cfg.beta)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-beta), log_t + torch.log(beta)]), dim=0)
    jsd = (beta * F.kl_div(log_m, log_t, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(log_m, log_s, reduction="none", log_target=True)).sum(-1)
    h_s = -(log_s.exp() * log_s).sum(-1)
    with torch.no_grad():
        h_t = -(log_t.exp() * log_t).sum(-1)
    valid = mask != 0
    gate = torch.sigmoid((h_s.detach() - h_t) / cfg.tau)
    direct = (gate * jsd)[valid].sum() / valid.sum()
    h_valid = h_s[valid]
    entropy = h_valid[top_entropy_selection(h_valid, cfg.rho)].mean()
    rows = torch.nonzero(valid)[:, 0]
    opener, _ = opener_selection(h_valid, rows, cfg.opener_fraction, *mask.shape)
    s_open, t_open = s[valid][opener], t[valid][opener]
    cand_s, ids = torch.topk(s_open, cfg.top_k, dim=-1)
    indirect = plackett_luce_nll(teacher_ordered(cand_s, t_open.gather(-1, ids))).mean()
    return direct + cfg.gamma_em * entropy + cfg.alpha * indirect


def run_variant(variant: str, tokens: int, vocab: int, chunk_size: int, repeats: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    student, teacher, mask = make_inputs(tokens, vocab)
    cfg = TSDKDLossConfig(chunk_size=chunk_size)
    baseline = peak_rss_bytes()
    times, loss = [], None
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        loss = tsdkd_loss(student, teacher, mask, cfg).loss if variant == "chunked" else dense_tsdkd(
            student, teacher, mask, cfg)
        loss.backward()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "peak_growth_bytes": peak_rss_bytes() - baseline, "seconds": min(times),
            "loss": float(loss), "grad_norm": float(student.grad.float().norm())}


# --smoke (tests/test_benchmarks.py keeps the script alive): small, yet each variant's peak still grows measurably
SMOKE = dict(tokens=128, vocab=4096, chunk_size=32, repeats=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk of the chunked variant")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the fastest is reported)")
    parser.add_argument("--variants", default="chunked,dense")
    parser.add_argument("--smoke", action="store_true", help=f"small sizes ({SMOKE}) unless given")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:   # explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.tokens, args.vocab, args.chunk_size, args.repeats)))
        return
    unit = args.tokens * args.vocab * 4
    print(f"tokens={args.tokens} vocab={args.vocab} chunk={args.chunk_size}; one fp32 [tokens, V] = {unit / 2**30:.2f}"
          f" GiB; bf16 inputs {2 * unit / 2 / 2**30:.2f} GiB (not counted)")
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
            print(f"{variant:8s} FAILED: exit {proc.returncode}, {reason}")
            continue
        r = results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} peak growth {r['peak_growth_bytes'] / 2**30:7.2f} GiB"
              f" ({r['peak_growth_bytes'] / unit:5.2f} x fp32 [tokens, V])  time {r['seconds']:7.2f} s"
              f"  loss {r['loss']:.6f}  |grad| {r['grad_norm']:.6f}")
    if len(results) == 2:
        c, d = results["chunked"], results["dense"]
        # the chunked variant may fit in what the allocator already held (a growth of 0): count it as one page, an
        # upper bound, and say so with "<="
        page = os.sysconf("SC_PAGE_SIZE")
        chunked, dense = max(c["peak_growth_bytes"], page), max(d["peak_growth_bytes"], page)
        bound = "<=" if c["peak_growth_bytes"] < page else "="
        print(f"peak memory ratio chunked/dense {bound} {chunked / dense:.3f} (1/{dense / chunked:.1f}); time ratio = "
              f"{c['seconds'] / d['seconds']:.2f}; loss rel. diff = {abs(c['loss'] - d['loss']) / abs(d['loss']):.2e}")
    if not math.isfinite(sum(r["loss"] for r in results.values())):
        sys.exit("a loss is not finite")


if __name__ == "__main__":
    main()
