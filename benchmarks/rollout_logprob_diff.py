"""The rollout guard's figure, ``rollout/logprob_diff`` (and ``rollout/kl``), measured by training: per model,
rollout engine and dtype, the mean over a few on-policy steps of how far the rollout engine's log-probabilities of
the tokens it sampled are from the trainer's own (engines/rollout_guard.py). One run prints the table the README
quotes and the margin to the default bound ``rollout.max_logprob_diff``.

    .venv/bin/python benchmarks/rollout_logprob_diff.py              # ~2-3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/rollout_logprob_diff.py --smoke      # 1 step per case, fp32, tied pair: seconds

Models: the shipped demo pair (head_dim 16, which vLLM's CPU attention refuses: our decode only), and a tiny Qwen2
pair with head_dim 64 whose student has TIED embeddings and peaked next-token distributions (weights drawn with std
0.2), saved to a temporary folder; and, as the failure the guard exists for, the same student on a vLLM replica
whose weight sync is skipped (it keeps vLLM's start-up weights). One process, a world of one (TP=1): the replicas
run in vLLM's external-launcher mode as in training and are kept until the process exits (vLLM's shutdown ends the
process group).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from megatron_tsdkd.config import load_config  # noqa: E402
from megatron_tsdkd.engines.rollout_guard import DIFF, KL  # noqa: E402

DEMO = os.path.join(ROOT, "megatron_tsdkd", "assets", "demo")
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
_kept = []   # trainers holding vLLM replicas live until the process exits


def tied_pair(folder: str) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(os.path.join(DEMO, "teacher"))
    torch.manual_seed(0)
    for name, tied in (("teacher", False), ("student", True)):
        Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok) + 3, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            initializer_range=0.2)).save_pretrained(os.path.join(folder, name))
        tok.save_pretrained(os.path.join(folder, name))
    return folder


def measure(models: str, engine: str, dtype: str, steps: int, work: str, skip_sync: bool = False) -> tuple:
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.engines.trainer import build_trainer

    overrides = [f"models.student.path={models}/student", f"models.teacher.path={models}/teacher",
                 "parallel.tensor=1", "data.eval=", "checkpoint.export_hf=", "checkpoint.interval=0",
                 "checkpoint.resume=none", f"schedule.max_steps={steps}", "logging.interval=1",
                 "logging.progress_bar=false", "data.cache_dir=none", "batch.global_size=8", "batch.micro_size=4",
                 "rollout.max_new_tokens=32", f"rollout.engine={engine}", f"precision.dtype={dtype}",
                 "rollout.logprob_diff_patience=0", f"checkpoint.dir={work}/ckpt", f"logging.dir={work}/tb"]
    original = VllmRollouts.sync
    if skip_sync:
        VllmRollouts.sync = lambda self: 0.0
    try:
        trainer = build_trainer(load_config(CONFIG, overrides))
        _kept.append(trainer)
        metrics = [trainer.train_step().metrics for _ in range(steps)]
    finally:
        VllmRollouts.sync = original
    return (sum(m[DIFF] for m in metrics) / steps, sum(m[KL] for m in metrics) / steps)


def main(argv=None) -> None:
    """Print the table; the replicas stay up (the caller ends the process: ``os._exit``, see _kept)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="fp32 only, the tied pair only, 1 step unless --steps "
                                                             "(tests/test_benchmarks.py)")
    args = parser.parse_args(argv)
    if args.smoke:   # an explicit --steps still wins
        parser.set_defaults(steps=1)
        args = parser.parse_args(argv)
    from megatron_tsdkd.runtime.warnings import install

    install()
    bound = load_config(CONFIG, []).rollout.max_logprob_diff
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tied = tied_pair(os.path.join(tmp, "tied"))
        cases = [("tied head_dim 64", tied, "megatron"), ("tied head_dim 64", tied, "vllm")]
        if not args.smoke:
            cases.insert(0, ("demo (head_dim 16)", DEMO, "megatron"))
        for dtype in ("fp32",) if args.smoke else ("fp32", "bf16"):
            for label, models, engine in cases:
                diff, kl = measure(models, engine, dtype, args.steps, os.path.join(tmp, f"{label}-{engine}-{dtype}"))
                rows.append((label, engine, dtype, diff, kl))
        diff, kl = measure(tied, "vllm", "fp32", args.steps, os.path.join(tmp, "stale"), skip_sync=True)
        rows.append(("tied head_dim 64", "vllm, sync skipped", "fp32", diff, kl))
    print(f"{'model':20} {'engine':20} {'dtype':6} {DIFF:>22} {KL:>12}")
    for label, engine, dtype, diff, kl in rows:
        print(f"{label:20} {engine:20} {dtype:6} {diff:22.3g} {kl:12.3g}")
    healthy = max(r[3] for r in rows if "skipped" not in r[1])
    print(f"largest healthy difference {healthy:.3g} nats = {healthy / bound:.2g}x rollout.max_logprob_diff "
          f"({bound:g}); the skipped sync {rows[-1][3]:.3g} = {rows[-1][3] / bound:.2g}x")
    print(json.dumps({"rows": rows}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
    os._exit(0)   # the replicas are never closed (see _kept)
