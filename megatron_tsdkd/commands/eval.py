"""``tsdkd-eval``: benchmark a model (Hugging Face folder, megatron checkpoint or run folder) at any TP/PP (run under
torchrun or srun for more than one process): lm-evaluation-harness tasks, or greedy accuracy on a JSONL.

    tsdkd-eval --model ckpts/run --tp 2 --tasks tsdkd_paper --data-dir bench_data --output results/after
    tsdkd-eval --model outputs/demo/student_hf --data megatron_tsdkd/assets/demo/data/eval.jsonl [--answer-pattern NAME|REGEX]
    tsdkd-eval --compare results/before results/after results/teacher [--output results/compare]
    lm_eval --model hf --model_args pretrained=student_hf --tasks gsm8k     # an exported folder, lm-eval's own backend
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_tsdkd.models.dtypes import DTYPE_NAMES
from megatron_tsdkd.models.source import FORMATS


def _parse(argv):
    p = argparse.ArgumentParser(prog="tsdkd-eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face folder, megatron checkpoint, or training run folder")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--data", help="JSONL with prompt/messages/instruction and an 'answer' per line (quick path)")
    p.add_argument("--answer-pattern", default=None,
                   help="quick path: a named extractor (default, answer-colon, final-number) or a regex (group 1)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated, or tsdkd_paper for the paper's ten")
    p.add_argument("--data-dir", help="offline benchmark data: DIR/<task>/<split>.{parquet,jsonl,json,arrow}")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--output", default="", help="folder for results.json, results.md, samples_<task>.jsonl")
    p.add_argument("--max-length", type=int, default=2048, help="tasks: context window (tokens)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compare", nargs="+", metavar="RUN", help="side-by-side table of earlier --output folders")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--predictions", default="", help="write each replica's predictions here (JSONL)")
    p.add_argument("--allow-unsafe-code", action="store_true",
                   help="tasks: run generated code (mbpp) even where bubblewrap cannot isolate it, under a "
                        "best-effort guard (also TSDKD_ALLOW_UNSAFE_CODE=1)")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    modes = [m for m in ("data", "tasks", "compare") if getattr(args, m)]
    if len(modes) != 1:
        sys.exit("error: give exactly one of --data FILE.jsonl, --tasks NAMES, --compare RUN ...")
    if args.compare:
        from megatron_tsdkd.eval.report import compare_runs
        try:
            print(compare_runs(args.compare, args.output or None), flush=True)
        except (OSError, ValueError) as error:
            sys.exit(f"error: --compare: {error}")
        return None
    if not args.model:
        sys.exit("error: --model is required with --data or --tasks")
    if args.tasks:
        return _run_tasks(args)
    import torch.distributed as dist

    from megatron_tsdkd.data import ChatTemplateTokenizer, load_chat_dataset
    from megatron_tsdkd.eval.accuracy import evaluate_accuracy
    from megatron_tsdkd.models import ModelError, check_parallel_layout
    from megatron_tsdkd.models.dtypes import DTYPES
    from megatron_tsdkd.models.source import load_model, resolve_model_source
    from megatron_tsdkd.models.token_spec import load_tokenizer, token_spec
    from megatron_tsdkd.runtime import ParallelLayout, init_distributed

    from megatron_tsdkd.data import DataFormatError
    from megatron_tsdkd.eval.answers import make_extractor
    from megatron_tsdkd.planning.inputs import launcher_world_size

    try:
        extractor = make_extractor(args.answer_pattern)
    except ValueError as error:
        sys.exit(f"error: {error}")

    try:  # every user error before any process group or model load, as one line
        source = resolve_model_source(args.model, args.format)
        check_parallel_layout(source.hf_config, args.tp, args.pp)
        source.check_weights()
        chat = ChatTemplateTokenizer(load_tokenizer(source.meta_dir))
        tokens = token_spec(chat, [source], args.tp)
    except (ModelError, OSError) as error:
        sys.exit(f"error: --model {args.model}: {error}")
    try:
        examples = load_chat_dataset(args.data, chat.tokenizer, mode="on_policy",
                                     max_length=args.max_prompt_length + 1,
                                     max_prompt_length=args.max_prompt_length).examples
    except (DataFormatError, ValueError, OSError) as error:
        sys.exit(f"error: --data: {error}")
    unanswered = next((e.source for e in examples if e.answer is None), None)
    if unanswered:
        sys.exit(f"error: --data: {unanswered} has no \"answer\"; every problem needs one to be scored")
    world = launcher_world_size()
    if world % (args.tp * args.pp):
        sys.exit(f"error: --tp {args.tp} x --pp {args.pp} needs a multiple of {args.tp * args.pp} processes, "
                 f"{world} started; launch with torchrun --nproc-per-node {args.tp * args.pp}")
    init_distributed(ParallelLayout(args.tp, args.pp))
    model = load_model(source, dtype=DTYPES[args.dtype], padded_vocab_size=tokens.padded_vocab_size)
    report = evaluate_accuracy(model, chat.tokenizer, examples, tokens=tokens, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, extractor=extractor)
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
        if report.matched == 0 and report.total:
            forms = args.answer_pattern or "the default forms #### N, The answer is N, \\boxed{N}"
            print(f"WARNING: no prediction matched any answer pattern ({forms}); the score is 0 by construction. "
                  f"Pass --answer-pattern answer-colon, final-number or a regex that fits the model's answers.",
                  file=sys.stderr, flush=True)
    return report.accuracy


def _run_tasks(args) -> dict:
    """lm-eval tasks through the tsdkd adapter; every user error is one line before any model is loaded."""
    import torch.distributed as dist

    from megatron_tsdkd.eval import sandbox
    from megatron_tsdkd.eval.harness_tasks import TaskError, check_data, expand_task_names, offline_env
    from megatron_tsdkd.models import ModelError

    offline_env()
    try:
        names = expand_task_names(args.tasks)
        if args.data_dir:
            check_data(names, args.data_dir, args.num_fewshot)
    except TaskError as error:
        sys.exit(f"error: --tasks {args.tasks}: {error}")
    if args.allow_unsafe_code:
        sandbox.allow_unsafe_code()
    refused = sandbox.refusal() if "mbpp" in names else None   # before any model is loaded
    if refused:
        sys.exit(f"error: --tasks {args.tasks}: {refused}")
    from megatron_tsdkd.planning.inputs import launcher_world_size

    world = launcher_world_size()
    if world % (args.tp * args.pp):
        sys.exit(f"error: --tp {args.tp} x --pp {args.pp} needs a multiple of {args.tp * args.pp} processes, "
                 f"{world} started; launch with torchrun --nproc-per-node {args.tp * args.pp}")
    from megatron_tsdkd.eval.lm_eval_model import TsdkdLM
    from megatron_tsdkd.eval.harness_tasks import run_tasks
    from megatron_tsdkd.eval.report import write_run

    try:
        lm = TsdkdLM.from_path(args.model, tp=args.tp, pp=args.pp, dtype=args.dtype, format=args.format,
                               batch_size=args.batch_size, max_length=args.max_length,
                               max_gen_toks=args.max_new_tokens, seed=args.seed)
    except (ModelError, OSError, ValueError) as error:
        sys.exit(f"error: --model {args.model}: {error}")
    try:
        results = run_tasks(lm, names, data_dir=args.data_dir, limit=args.limit, num_fewshot=args.num_fewshot,
                            apply_chat_template=args.apply_chat_template, seed=args.seed)
    except TaskError as error:
        sys.exit(f"error: --tasks {args.tasks}: {error}")
    if dist.get_rank() == 0:
        table = write_run(results, names, args, lm)
        print(table, flush=True)
        if "mbpp" in names:
            print(sandbox.isolation().line(), flush=True)
    return results
