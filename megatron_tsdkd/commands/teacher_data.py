"""``tools/generate_teacher_data.py``: a teacher model answers every prompt of a JSONL file; the answers feed
off-policy training.

Launch with torchrun (world = TP x PP x DP). Input lines are parsed by megatron_tsdkd.data.records (``messages``,
``prompt`` or ``instruction``), rendered with the tokenizer's chat template (generation prompt added) by
megatron_tsdkd.data.chat_tokenization, so the teacher sees exactly the prompt the student will train on. Each
output line is the source line with the teacher's answer put in: ``prompt`` and ``response`` (text, end-of-turn
token dropped), ``messages`` (for chat sources: the prompt turns plus the teacher's assistant turn, so the
data loader, which reads ``messages`` first, takes the teacher's answer), ``prompt_index``, ``sample_index`` and
``finish_reason`` ("eos" or "length": a length-cut answer has no end of turn; filter those if you want).

Resumable: prompts are cut into fixed batches by their index and batch k is sampled with seed (seed, k),
whichever data-parallel replica runs it, so the content depends neither on DP nor on interruptions. Rank 0 appends each
round of batches with one write + fsync; on restart it drops a torn last line and skips prompts already written.
(A kill in the middle of that one write could leave part of a batch; its missing prompts are then generated as a
smaller batch: valid samples, but not the same draws as an uninterrupted run.) The settings that decide the content
(model, prompts, seed, batch size, sampling) are recorded in ``<output>.settings.json``; resuming with other settings
stops with the list of what differs instead of mixing two data sets in one file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

import torch.distributed as dist

from megatron_tsdkd.generation import SamplingConfig, generate
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.runtime.atomic_files import write_json_atomic
from megatron_tsdkd.runtime.collectives import barrier, broadcast_object, gather_objects
from megatron_tsdkd.runtime.seeds import derive_seed

SETTINGS_SUFFIX = ".settings.json"   # beside the output: the settings it was written with


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_teacher_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder or megatron-core checkpoint folder")
    p.add_argument("--prompts", required=True, help="input JSONL (messages / prompt / instruction lines)")
    p.add_argument("--output", required=True, help="output JSONL; appended to and resumed if it exists")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's, or its hf_meta/)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on GPU, fp32 on CPU (a megatron checkpoint: its own dtype)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch and data-parallel replica")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json, else 1.0")
    p.add_argument("--top-p", type=float, default=None, help="default: generation_config.json, else 1.0")
    p.add_argument("--top-k", type=int, default=None, help="default: generation_config.json, else 0 (off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (generation_config's do_sample is not read)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------------------------
# Input and output files

def read_prompts(path: str) -> list[tuple[dict, tuple[dict, ...]]]:
    """(source object, prompt messages) per non-blank line; a malformed line stops with ``path:line: reason``."""
    from megatron_tsdkd.data.records import json_lines, parse_record

    items = [(obj, parse_record(obj, where, "on_policy").prompt_messages) for obj, where in json_lines(path)]
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def written_prompt_indices(path: str, num_prompts: int) -> set[int]:
    """Prompts already in ``path``; a torn last line (a write cut by a kill) is removed from the file first."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as handle:
        data = handle.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    done = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        index = json.loads(line).get("prompt_index")
        if not isinstance(index, int) or not 0 <= index < num_prompts:
            raise ValueError(f"{path}:{number}: prompt_index {index!r} does not belong to this prompts file "
                             f"({num_prompts} prompts); write to a new output file")
        done.add(index)
    return done


def append_lines(path: str, records: list[dict]) -> None:
    """All ``records`` with one write and an fsync, so an interruption loses at most this round."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def output_record(source: dict, prompt_messages: tuple[dict, ...], response: str, prompt_index: int,
                  sample_index: int, finished: bool) -> dict:
    record = dict(source)
    if "messages" in source:
        record["messages"] = [*prompt_messages, {"role": "assistant", "content": response}]
    if "prompt" not in source:
        record["prompt"] = next(m["content"] for m in reversed(prompt_messages) if m["role"] == "user")
    record.update(response=response, prompt_index=prompt_index, sample_index=sample_index,
                  finish_reason="eos" if finished else "length")
    return record


# ---------------------------------------------------------------------------------------------------------------
# Sampling settings

def sampling_config(args, meta_dir: str) -> SamplingConfig:
    """Command-line values, else the model's generation_config.json, else SamplingConfig's defaults."""
    defaults = {}
    path = os.path.join(meta_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            defaults = json.load(f)

    def pick(name, fallback):
        for value in (getattr(args, name), defaults.get(name)):
            if value is not None:
                return value
        return fallback

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=pick("temperature", 1.0),
                          top_p=pick("top_p", 1.0), top_k=pick("top_k", 0), greedy=args.greedy,
                          num_samples=args.num_samples)


# ---------------------------------------------------------------------------------------------------------------

def run_settings(args, source, config: SamplingConfig) -> dict:
    """What decides the content of the output: a resumed run must use the same, or it would mix two data sets."""
    return {"model": os.path.abspath(source.weights), "prompts": os.path.abspath(args.prompts), "seed": args.seed,
            "batch_size": args.batch_size, "sampling": dataclasses.asdict(config)}


def check_settings(path: str, settings: dict) -> None:
    """Record the settings beside a new output; refuse to resume an output written with other settings. Rank 0
    alone reads and writes the record (before any process group; if it stops, the launcher stops the others)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if changed:
            raise SystemExit(f"error: --output was written with other settings ({', '.join(changed)} differ from "
                             f"{path}); resume with the same settings or write to a new output file")
    else:
        write_json_atomic(path, settings, indent=1, sort_keys=True)


def write_teacher_data(args, source, config: SamplingConfig) -> None:
    """Collective over the world: every replica generates its batches, rank 0 writes them in batch order."""
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.data.chat_tokenization import ChatTemplateTokenizer
    from megatron_tsdkd.models.source import load_model
    from megatron_tsdkd.models.token_spec import load_tokenizer, token_spec

    items = read_prompts(args.prompts)
    rank = dist.get_rank()
    done = broadcast_object(written_prompt_indices(args.output, len(items)) if rank == 0 else None, src=0)
    batches = [(k, [i for i in range(start, min(start + args.batch_size, len(items))) if i not in done])
               for k, start in enumerate(range(0, len(items), args.batch_size))]
    batches = [(k, indices) for k, indices in batches if indices]
    if not batches:
        if rank == 0:
            print(f"{args.output} already answers all {len(items)} prompts of {args.prompts}; nothing to do")
        return

    tokenizer = load_tokenizer(args.tokenizer or source.meta_dir)
    chat = ChatTemplateTokenizer(tokenizer)
    tokens = token_spec(chat, [source], ps.get_tensor_model_parallel_world_size())
    model = load_model(source, dtype=DTYPES.get(args.dtype), padded_vocab_size=tokens.padded_vocab_size)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    first_of_replica = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(done), desc="teacher data", unit="prompt", dynamic_ncols=True)
    for round_start in range(0, len(batches), dp):
        round_batches = batches[round_start:round_start + dp]
        mine = round_batches[dp_rank] if dp_rank < len(round_batches) else None
        records = []
        if mine is not None:
            k, indices = mine
            out = generate(model, [chat.prompt_ids(items[i][1]) for i in indices], config,
                           eos_token_ids=tokens.stop_ids, pad_token_id=tokens.pad_id, vocab_size=tokens.vocab_size,
                           generator_seed=derive_seed(args.seed, k))
            for row, ids in enumerate(out.responses):
                index = indices[out.prompt_index[row]]
                text_ids = ids[:-1] if out.finished[row] else ids
                records.append(output_record(items[index][0], items[index][1],
                                             tokenizer.decode(text_ids, skip_special_tokens=True), index,
                                             row % config.num_samples, out.finished[row]))
        gathered = gather_objects((dp_rank, records) if first_of_replica else None, dst=0)
        if rank == 0:
            by_replica = dict(g for g in gathered if g is not None)
            ordered = [r for d in range(len(round_batches)) for r in by_replica[d]]
            append_lines(args.output, ordered)
            bar.update(sum(len(indices) for _, indices in round_batches))
    if bar is not None:
        bar.close()
    barrier()


def main(argv: Optional[list[str]] = None) -> None:
    from megatron_tsdkd.runtime import ParallelLayout, init_distributed

    from megatron_tsdkd.models import ModelError
    from megatron_tsdkd.models.source import resolve_model_source

    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    try:  # every user error before any process group
        source = resolve_model_source(args.model)
        config = sampling_config(args, source.meta_dir)
    except (ModelError, ValueError) as error:
        raise SystemExit(f"error: --model {args.model}: {error}") from None
    check_settings(args.output + SETTINGS_SUFFIX, run_settings(args, source, config))
    init_distributed(ParallelLayout(tensor=args.tp, pipeline=args.pp))
    write_teacher_data(args, source, config)
