"""``tsdkd-eval``: greedy accuracy of a model (Hugging Face folder or megatron checkpoint) on a JSONL of problems
with answers, at any TP/PP (run under torchrun or srun for more than one process).

    tsdkd-eval --model outputs/demo/student_hf --data megatron_tsdkd/assets/demo/data/eval.jsonl
    torchrun --nproc-per-node 2 -m megatron_tsdkd.cli eval --model ckpts/ --format mcore --tp 2 --data gsm8k.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(prog="tsdkd-eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder, or megatron checkpoint folder (--format mcore)")
    p.add_argument("--format", choices=("hf", "mcore"), default="hf")
    p.add_argument("--data", required=True, help="JSONL with prompt/messages/instruction and an 'answer' per line")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    p.add_argument("--predictions", default="", help="write each replica's predictions here (JSONL)")
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = _parse(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_tsdkd.data import ChatTemplateTokenizer, load_chat_dataset
    from megatron_tsdkd.eval.accuracy import evaluate_accuracy
    from megatron_tsdkd.models import (HF_META_DIR, build_model, check_parallel_layout, load_hf_weights,
                                       load_mcore_weights, read_hf_config)
    from megatron_tsdkd.runtime import ParallelLayout, init_distributed

    meta = os.path.join(args.model, HF_META_DIR) if args.format == "mcore" else args.model
    if args.format == "mcore" and not os.path.isdir(meta):  # a training run folder: follow its `latest` marker
        from megatron_tsdkd.models.mcore_checkpoint import resolve_checkpoint
        meta = os.path.join(resolve_checkpoint(args.model), HF_META_DIR)
    try:
        hf_config = read_hf_config(meta)
        check_parallel_layout(hf_config, args.tp, args.pp)
    except (ValueError, OSError) as error:
        sys.exit(f"error: --model {args.model}: {error}")
    tokenizer = AutoTokenizer.from_pretrained(meta)
    examples = load_chat_dataset(args.data, tokenizer, mode="on_policy", max_length=args.max_prompt_length + 1,
                                 max_prompt_length=args.max_prompt_length).examples
    init_distributed(ParallelLayout(args.tp, args.pp))
    model = build_model(hf_config, params_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    (load_hf_weights if args.format == "hf" else load_mcore_weights)(model, args.model)
    chat = ChatTemplateTokenizer(tokenizer)
    report = evaluate_accuracy(model, tokenizer, examples, stop_token_ids=sorted({chat.end_of_turn_id,
                               tokenizer.eos_token_id} - {None}), pad_token_id=chat.pad_id, vocab_size=len(tokenizer),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.predictions:
        from megatron.core import parallel_state as ps
        if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
            path = args.predictions if ps.get_data_parallel_world_size() == 1 else \
                f"{args.predictions}.dp{ps.get_data_parallel_rank()}"
            with open(path, "w") as f:
                for sample in report.samples:
                    f.write(json.dumps(sample) + "\n")
    if dist.get_rank() == 0:
        print(f"accuracy of {args.model} on {args.data}: {report}", flush=True)
    return report.accuracy
