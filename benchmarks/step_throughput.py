"""Tokens/s of one on-policy TSD-KD training step, with its phase breakdown, against a plain Hugging Face step doing
the same work the way the reference code does (HF ``generate`` + full-vocabulary dense loss), in one run.

    .venv/bin/python benchmarks/step_throughput.py                      # CPU, tiny shapes, world of one
    .venv/bin/python benchmarks/step_throughput.py --student-hidden 1536 --student-layers 28 \
        --teacher-hidden 3584 --teacher-layers 28 --vocab 152064 --dtype bf16   # Qwen2.5-1.5B / 7B shapes, one GPU

Both sides start from the same random weights (saved as Hugging Face folders), the same prompts and the same
sampling settings, and count the same tokens (prompt + generated) per step. The figures are wall-clock seconds per
step after one warm-up step; the ratio is ours / HF in tokens per second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_models(args, root: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_tsdkd.data.arithmetic_chains import make_problems

    tok_dir = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo", "teacher")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    for name, hidden, layers in (("student", args.student_hidden, args.student_layers),
                                 ("teacher", args.teacher_hidden, args.teacher_layers)):
        torch.manual_seed(0)
        heads = max(hidden // 128, 2)
        config = Qwen2Config(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                             max_position_embeddings=4096, tie_word_embeddings=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(config).save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for p in make_problems(seed=5, count=max(args.batch * 4, 64)):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution}) + "\n")


def ours(args, root: str) -> dict:
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.training.trainer import Trainer

    cfg = load_config(None, [
        f"models.student.path={root}/student", f"models.teacher.path={root}/teacher", f"data.train={root}/train.jsonl",
        f"batch.global_size={args.batch}", f"batch.micro_size={args.batch}", f"precision.dtype={args.dtype}",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.on_policy_prob=1", f"schedule.max_steps={args.steps + 1}",
        f"checkpoint.dir={root}/ck", "checkpoint.resume=none", "logging.progress_bar=false", f"logging.dir={root}/tb",
        "data.max_length=256", "data.max_prompt_length=64", "memory.enforce=false"])
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up
    results = [trainer.train_step().metrics for _ in range(args.steps)]
    keys = [k for k in results[0] if k.startswith("time/")] + ["throughput/tokens_per_s"]
    return {k: sum(r[k] for r in results) / len(results) for k in keys}


def hf_reference(args, root: str) -> dict:
    """The reference recipe: HF generate with its KV cache, then both models' full-vocabulary logits and a dense
    TSD-KD loss (benchmarks/loss_memory.py's transcription), AdamW step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_tsdkd.data import load_chat_dataset
    from megatron_tsdkd.losses import TSDKDLossConfig
    from loss_memory import dense_tsdkd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    student = AutoModelForCausalLM.from_pretrained(f"{root}/student", dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(f"{root}/teacher", dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(f"{root}/student")
    examples = load_chat_dataset(f"{root}/train.jsonl", tok, mode="on_policy", max_length=256,
                                 max_prompt_length=64).examples
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    cfg = TSDKDLossConfig()
    times = []
    for step in range(args.steps + 1):
        batch = examples[step * args.batch:(step + 1) * args.batch]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(batch):
            ids[i, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            attn[i, width - len(e.prompt_ids):] = 1
        ids, attn = ids.to(device), attn.to(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=tok.pad_token_id)
        full_attn = torch.cat([attn, torch.ones_like(out[:, width:])], dim=1)
        mask = torch.zeros(out.shape, dtype=torch.float32, device=device)
        mask[:, width - 1:-1] = 1.0
        with torch.no_grad():
            t_logits = teacher(input_ids=out, attention_mask=full_attn).logits
        s_logits = student(input_ids=out, attention_mask=full_attn).logits
        n = mask.sum().long()
        rows = mask.flatten().bool()
        loss = dense_tsdkd(s_logits.flatten(0, 1)[rows].unsqueeze(0), t_logits.flatten(0, 1)[rows].unsqueeze(0),
                           torch.ones(1, int(n), device=device), cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append((time.perf_counter() - start, out.numel()))
    seconds = sum(t for t, _ in times) / len(times)
    return {"time/step": seconds, "throughput/tokens_per_s": sum(n for _, n in times) / sum(t for t, _ in times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="tsdkd_bench_")
    make_models(args, root)
    ours_figures = ours(args, root)
    hf_figures = hf_reference(args, root)
    print(json.dumps({"ours": ours_figures, "hf_reference": hf_figures}, indent=1))
    ratio = ours_figures["throughput/tokens_per_s"] / hf_figures["throughput/tokens_per_s"]
    print(f"tokens/s: ours {ours_figures['throughput/tokens_per_s']:.1f}, HF-style "
          f"{hf_figures['throughput/tokens_per_s']:.1f}, ratio {ratio:.2f}x")
    print("phase seconds (ours): " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in ours_figures.items()
                                              if k.startswith("time/")))


if __name__ == "__main__":
    main()
