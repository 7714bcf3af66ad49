"""Padded / real tokens and training step time: micro-batches padded to the step's longest row (before) against
each micro-batch padded to its own longest row (after; data/collate.py micro_batches), and with the step's rows
sorted by length (``batch.sort_by_length``), in one run.

    .venv/bin/python benchmarks/length_aware_batches.py                 # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/length_aware_batches.py --scale 4 --batch 32 --micro 4 --steps 5
    .venv/bin/python benchmarks/length_aware_batches.py --smoke        # tiny, seconds: the suite's check

Length mix: prompts uniform in 50..900 tokens, responses uniform in 20..1024 (a reasoning-distillation step).

1. Padding, at those lengths: the rows of ``--ratio-steps`` steps of ``--batch`` rows (one data-parallel rank's
   share) cut by micro_batches itself at several micro-batch sizes; padded tokens (rows x width, summed over the
   micro-batches) over real tokens. "before" pads every micro-batch to the step's longest row, as the trainer did.
2. Step time, on CPU: the megatron trainer (gkd: co-located teacher forward, student forward/backward, optimizer)
   on tiny random models, every length divided by ``--scale`` (so the ratio distribution stays that of the mix),
   the step's (prompt, response) rows drawn from the mix instead of a data set. The three variants see the same
   rows; each is timed over ``--steps`` steps after one warm-up step (wall clock). "before" is the old padding,
   reconstructed here by right-padding today's micro-batches to the step's longest row (exactly the old tensors).
   One throw-away build and step first, so no variant pays the first-build costs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from megatron_tsdkd.data.collate import TrainingBatch, micro_batches  # noqa: E402

PROMPTS, RESPONSES = (50, 900), (20, 1024)
DEMO_TOKENIZER = os.path.join(HERE, "..", "megatron_tsdkd", "assets", "demo", "teacher")


def draw_rows(rng: random.Random, count: int, scale: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    """``count`` (prompt, response) rows of random ids with lengths from the mix, divided by ``scale``."""
    rows = []
    for _ in range(count):
        p = max(1, round(rng.randint(*PROMPTS) / scale))
        r = max(1, round(rng.randint(*RESPONSES) / scale))
        rows.append(([rng.randrange(3, vocab) for _ in range(p)], [rng.randrange(3, vocab) for _ in range(r)]))
    return rows


def pad_to_step(batches: list[TrainingBatch], pad_id: int) -> list[TrainingBatch]:
    """The old padding: every micro-batch right-padded to the step's longest row."""
    width = max(b.input_ids.shape[1] for b in batches)
    out = []
    for b in batches:
        extra = width - b.input_ids.shape[1]
        pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
        out.append(TrainingBatch(pad(b.input_ids, pad_id), pad(b.labels, pad_id), pad(b.loss_mask, 0.0),
                                 torch.arange(width).expand(b.input_ids.shape[0], width), b.prompt_lengths, b.lengths))
    return out


VARIANTS = {"before": dict(step_padding=True, sort=False), "after": dict(step_padding=False, sort=False),
            "after+sort": dict(step_padding=False, sort=True)}


def cut(rows, micro: int, max_length: int, variant: str, device=None) -> list[TrainingBatch]:
    v = VARIANTS[variant]
    batches, _ = micro_batches(rows, micro, 0, max_length, device, sort_by_length=v["sort"])
    return pad_to_step(batches, 0) if v["step_padding"] else batches


def padded_tokens(batches) -> int:
    return sum(b.input_ids.numel() for b in batches)


def padding_ratios(args) -> dict:
    rng = random.Random(args.seed)
    steps = [draw_rows(rng, args.batch, 1, 1000) for _ in range(args.ratio_steps)]
    real = sum(len(p) + len(r) for rows in steps for p, r in rows)
    return {micro: {v: sum(padded_tokens(cut(rows, micro, 4096, v)) for rows in steps) / real for v in VARIANTS}
            for micro in (1, 2, 4, 8, 16) if micro <= args.batch}


def make_workdir(root: str) -> int:
    """A tiny teacher (Qwen2) and student (Llama) on the demo tokenizer, and a small data set (its rows are
    replaced by the mix's); returns the vocabulary size."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    vocab = len(tok)
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    teacher = Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                           num_attention_heads=8, num_key_value_heads=2, **common))
    student = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, **common))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for p in make_problems(seed=7, count=64):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution}) + "\n")
    return vocab


def step_times(args, root: str, vocab: int) -> dict:
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.loop import Rollout
    from megatron_tsdkd.engines.trainer import build_trainer

    max_length = -(-(PROMPTS[1] + RESPONSES[1]) // args.scale)
    argv = [f"models.student.path={root}/student", f"models.teacher.path={root}/teacher",
            f"data.train={root}/train.jsonl", "method.name=gkd", "precision.dtype=fp32", "rollout.on_policy_prob=0",
            f"data.max_prompt_length={-(-PROMPTS[1] // args.scale)}",
            f"batch.global_size={args.batch}", f"batch.micro_size={args.micro}", f"data.max_length={max_length}",
            f"schedule.max_steps={args.steps + 2}", f"checkpoint.dir={root}/ck", "checkpoint.resume=none",
            "checkpoint.interval=0", "logging.progress_bar=false", f"logging.dir={root}/tb", "memory.enforce=false"]
    rng = random.Random(args.seed + 1)
    steps = [draw_rows(rng, args.batch, args.scale, vocab) for _ in range(args.steps + 1)]
    out = {}
    build_trainer(load_config(None, argv)).train_step()   # first-build costs (imports, allocator)
    for variant in VARIANTS:
        trainer = build_trainer(load_config(None, argv))
        queue = iter(steps)
        # the step's public seams (engines/trainer.py): the mix's rows instead of the data set's, cut our way
        trainer.rollout = lambda examples: Rollout(next(queue), on_policy=False)
        padded = []

        def collate(rollout, examples, variant=variant, padded=padded):
            batches = cut(rollout.pairs, args.micro, max_length, variant, trainer.engine.device)
            padded.append(padded_tokens(batches))
            return batches, max(b.input_ids.shape[1] for b in batches)

        trainer.batches_of = collate
        trainer.train_step()   # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        seconds = (time.perf_counter() - start) / args.steps
        real = sum(len(p) + len(r) for rows in steps[1:] for p, r in rows)
        out[variant] = {"seconds": seconds, "ratio": sum(padded[1:]) / real}
    return out


# --smoke (tests/test_benchmarks.py keeps the script alive): 4 rows a step, 2 per micro-batch, lengths / 32
SMOKE = dict(batch=4, micro=2, scale=32, steps=1, ratio_steps=4, threads=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="rows per step on one data-parallel rank")
    p.add_argument("--micro", type=int, default=4, help="rows per micro-batch (step time)")
    p.add_argument("--scale", type=int, default=8, help="step time: every length divided by this")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant, after one warm-up")
    p.add_argument("--ratio-steps", type=int, default=200, help="steps drawn for the padding ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = p.parse_args(argv)
    if args.smoke:   # explicit flags still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    ratios = padding_ratios(args)
    with tempfile.TemporaryDirectory() as root:
        vocab = make_workdir(root)
        times = step_times(args, root, vocab)

    print(f"length mix: prompts {PROMPTS[0]}-{PROMPTS[1]} tokens, responses {RESPONSES[0]}-{RESPONSES[1]} (uniform); "
          f"{args.batch} rows per step")
    print(f"padded / real tokens over {args.ratio_steps} steps at these lengths:")
    print("  micro-batch  " + "".join(f"{v:>12}" for v in VARIANTS) + "   before/after")
    for micro, r in ratios.items():
        print(f"  {micro:>11}  " + "".join(f"{r[v]:12.3f}" for v in VARIANTS) + f"   {r['before'] / r['after']:8.2f}x")
    print(f"step time on CPU ({args.threads} threads; gkd, teacher 4x256, student 2x128; lengths / {args.scale}; "
          f"micro-batch {args.micro}; mean of {args.steps} steps):")
    for variant, t in times.items():
        print(f"  {variant:<11} {t['seconds']:7.3f} s/step   padded/real {t['ratio']:.3f}")
    print(f"  speed-up after vs before: {times['before']['seconds'] / times['after']['seconds']:.2f}x; "
          f"after+sort vs before: {times['before']['seconds'] / times['after+sort']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
