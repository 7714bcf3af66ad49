"""Step time of the teacher co-located in the student's layout against the teacher on process groups of its own
(engines/megatron/teacher_layout.py): the same layout both ways, and an independent layout, in one run.

    .venv/bin/python benchmarks/teacher_layout_step.py              # CPU: 2 gloo processes
    .venv/bin/python benchmarks/teacher_layout_step.py --smoke      # tiny, one step, TP=2 variants: the suite's check

Variants (2 ranks; each is a TSD-KD run of the same models, data and seed, off-policy so that every step does the
same work):
  co-located       student TP=2, teacher rides in its stages (one schedule for both; today's path)
  own groups       student TP=2, teacher TP=2 on its own groups (parallel.teacher.colocated=false): the new path
                   in the symmetric layout (its own forward pass first, the handoff a local slice)
  own layout       student TP=1 x DP=2, teacher TP=2 (parallel.teacher.tensor=2): each teacher replica serves two
                   student replicas
  co-located PP=2  both PP=2: the teacher's stages ride in the student's 1F1B
  own groups PP=2  both PP=2 on the teacher's own groups: its forward-only pipeline runs before the student's (its
                   own fill and drain), and the hidden states cross from its last stage to the student's
Random tiny models built with transformers (teacher Qwen2, student Llama; GQA), the demo tokenizer. One process pair
(this script again, as RANK 0 and 1) runs every variant in turn (imports once); each variant builds its trainer,
runs one warm-up step and then ``--steps`` timed steps (wall clock; on GPU a device synchronisation around each). Printed: a line per variant with
its mean step and the trainer's time/teacher_forward, then each variant's step time over the co-located one.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "megatron_tsdkd", "assets", "demo", "teacher")

VARIANTS = {
    "co-located": ["parallel.tensor=2"],
    "own groups": ["parallel.tensor=2", "parallel.teacher.colocated=false"],
    "own layout": ["parallel.tensor=1", "parallel.teacher.tensor=2"],
    "co-located PP=2": ["parallel.pipeline=2"],
    "own groups PP=2": ["parallel.pipeline=2", "parallel.teacher.colocated=false"],
}


def _models(folder: str, teacher_hidden: int, student_hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=teacher_hidden, intermediate_size=2 * teacher_hidden,
                                 num_hidden_layers=2 * layers, num_attention_heads=8, num_key_value_heads=4,
                                 **ids)).save_pretrained(os.path.join(folder, "teacher"))
    LlamaForCausalLM(LlamaConfig(hidden_size=student_hidden, intermediate_size=2 * student_hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 **ids)).save_pretrained(os.path.join(folder, "student"))
    for name in ("teacher", "student"):
        tok.save_pretrained(os.path.join(folder, name))
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for p in make_problems(seed=7, count=256):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")


def _rank(folder: str, args, variants: list) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_* set by ``main``): every variant in turn; rank 0 writes the results."""
    import torch

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    results = {}
    for name in variants:
        layout = VARIANTS[name]
        cfg = load_config(None, [
            f"models.student.path={folder}/student", f"models.teacher.path={folder}/teacher",
            f"data.train={folder}/train.jsonl", "method.name=tsdkd", "rollout.on_policy_prob=0",
            f"data.max_length={args.length}", "data.max_prompt_length=32", "precision.dtype=fp32",
            f"batch.global_size={args.batch}", f"batch.micro_size={args.micro}",
            f"schedule.max_steps={args.steps + 1}", "logging.progress_bar=false", f"logging.dir={folder}/tb",
            "logging.interval=1", f"checkpoint.dir={folder}/ck", "checkpoint.interval=0", "checkpoint.resume=none",
            *layout])
        trainer = build_trainer(cfg)
        times, teacher = [], []
        for step in range(args.steps + 1):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = trainer.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if step:   # the first is the warm-up
                times.append(time.perf_counter() - start)
                teacher.append(result.metrics["time/teacher_forward"] if result.metrics else 0.0)
        results[name] = (sum(times) / len(times), sum(teacher) / len(teacher))
    if os.environ["RANK"] == "0":
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(results, f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, one timed step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="student layers (the teacher has twice as many)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank-of", metavar="FOLDER", help=argparse.SUPPRESS)   # a rank this script started
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.teacher_hidden, args.student_hidden, args.layers = 1, 64, 32, 1
        args.batch, args.micro, args.length = 4, 2, 64
    variants = [name for name in VARIANTS if not (args.smoke and "PP=2" in name)]   # smoke: the TP=2 three only
    if args.rank_of:
        _rank(args.rank_of, args, variants)
        return
    with tempfile.TemporaryDirectory() as folder:
        _models(folder, args.teacher_hidden, args.student_hidden, args.layers)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ranks = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *(argv if argv is not None
                                                                                 else sys.argv[1:]),
                                   "--rank-of", folder],
                                  env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in range(2)]
        codes = [p.wait() for p in ranks]
        if any(codes):
            sys.exit(f"a rank failed: exit statuses {codes}")
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
    print(f"teacher {2 * args.layers} layers x {args.teacher_hidden}, student {args.layers} layers x "
          f"{args.student_hidden}, {args.batch} sequences of <= {args.length} tokens per step, 2 ranks")
    for name, (step, teacher) in results.items():
        print(f"{name:<15} step {step:.3f} s  teacher forward {teacher:.3f} s")
    base = results["co-located"][0]
    pipelined = (f"; at PP=2 own groups {results['own groups PP=2'][0] / results['co-located PP=2'][0]:.2f}x"
                 if "co-located PP=2" in results else "")
    print(f"step time over co-located: own groups {results['own groups'][0] / base:.2f}x, own layout "
          f"{results['own layout'][0] / base:.2f}x{pipelined}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
