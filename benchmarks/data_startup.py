"""Data start-up per rank: today's JSONL path (every rank tokenises the whole set into Python lists) against the
tokenise-once cache (one process builds, the others wait, every rank memory-maps), first build and cached start.

    python benchmarks/data_startup.py [--rows 1000000] [--ranks 2] [--shards 8] [--work DIR] [--baseline-rows N]
    python benchmarks/data_startup.py --smoke     # 64 rows, 1 rank, temporary data removed after: the suite's check

A synthetic set (arithmetic-chain prompts and worked responses, as the demo's, lengths varied) is written once as
parquet shards and, with the same rows, as JSONL. Each phase starts ``--ranks`` processes at once, as torchrun starts
a node's ranks; each reports the seconds its data loading took (imports excluded: both paths import the same
libraries) and its peak RSS (ru_maxrss). Tokenizer: the demo's (assets/demo/teacher). Printed: one line per phase with
the slowest rank's time and the largest peak RSS, and the ratios against today's path, all measured in this run.
``--baseline-rows N`` runs today's path on the first N rows only (it takes hours at 1M rows on a small shared CPU) and
says so; its figures are then also scaled linearly to the full set, marked as an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "megatron_tsdkd", "assets", "demo", "teacher")

CHILD = r"""
import json, os, resource, sys, time
mode, path, cache = sys.argv[1], sys.argv[2], sys.argv[3]
from transformers import AutoTokenizer
from megatron_tsdkd.data import ChatTemplateTokenizer, load_chat_dataset
from megatron_tsdkd.data.chat_tokenization import TruncationStats, fit_to_length
from megatron_tsdkd.data.records import read_jsonl
import megatron_tsdkd.data.token_cache, megatron_tsdkd.data.sources   # imports outside the timed part
tokenizer = AutoTokenizer.from_pretrained(sys.argv[4])
start = time.perf_counter()
if mode == "jsonl":    # today's path (before the cache): per row, in memory, on every rank
    chat, stats = ChatTemplateTokenizer(tokenizer), TruncationStats()
    examples = [e for e in (fit_to_length(chat.encode_record(r), 512, 256, stats) for r in read_jsonl(path))
                if e is not None]
    n, lengths = len(examples), sum(len(e.input_ids) for e in examples)
else:
    data = load_chat_dataset(path, tokenizer, max_length=512, max_prompt_length=256, cache_dir=cache)
    n, lengths = len(data), int(data.lengths().sum())   # the sampler's length pass (group_by_length) included
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "examples": n, "tokens": lengths}))
"""


def synthetic_rows(count: int, seed: int = 0):
    """Arithmetic chains of 2-40 steps: prompts of ~15-130 tokens, responses of ~30-500 (demo tokenizer)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    steps = rng.integers(2, 41, size=count)
    for i in range(count):
        numbers = rng.integers(1, 10, size=steps[i] + 1).tolist()
        signs = rng.integers(0, 2, size=steps[i]).tolist()
        total, expression, work = numbers[0], str(numbers[0]), []
        for n, s in zip(numbers[1:], signs):
            op = "+" if s else "-"
            new = total + n if s else total - n
            work.append(f"{total}{op}{n}={new}.")
            expression += f"{op}{n}"
            total = new
        yield {"prompt": f"Compute {expression}.", "response": " ".join(work) + f" The answer is {total}.",
               "answer": str(total)}


def write_data(work: str, rows: int, shards: int) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, folder = os.path.join(work, "train.jsonl"), os.path.join(work, "parquet")
    if os.path.exists(os.path.join(work, f"done-{rows}-{shards}")):
        return jsonl, folder
    os.makedirs(folder, exist_ok=True)
    per_shard = -(-rows // shards)
    shard_path = lambda k: os.path.join(folder, f"train-{k:05d}-of-{shards:05d}.parquet")  # noqa: E731
    with open(jsonl, "w") as out:
        batch, shard = [], 0
        for row in synthetic_rows(rows):
            out.write(json.dumps(row) + "\n")
            batch.append(row)
            if len(batch) == per_shard:
                pq.write_table(pa.Table.from_pylist(batch), shard_path(shard))
                batch, shard = [], shard + 1
        if batch:
            pq.write_table(pa.Table.from_pylist(batch), shard_path(shard))
    open(os.path.join(work, f"done-{rows}-{shards}"), "w").close()
    return jsonl, folder


def phase(mode: str, path: str, cache: str, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, path, cache, TOKENIZER], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(ranks)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{mode} rank failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - start
    return {"seconds": max(r["seconds"] for r in results), "rss_mib": max(r["rss_mib"] for r in results),
            "per_rank": results, "wall": wall}


# --smoke (tests/test_benchmarks.py keeps the script alive): every phase at 64 rows, one rank each
SMOKE = dict(rows=64, ranks=1, shards=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=2, help="processes started at once, as one node's ranks")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--work", default="", help="folder for the synthetic data and the cache (default: a temp dir)")
    parser.add_argument("--baseline-rows", type=int, default=0, help="today's path on this many first rows only")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given; a temporary "
                                                             "--work is removed at the end")
    args = parser.parse_args(argv)
    if args.smoke:   # explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="data_startup-")
    os.makedirs(work, exist_ok=True)
    try:
        measure(args, work)
    finally:
        if args.smoke and not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: str) -> None:
    """Write the data into ``work``, run the three phases and print their figures and ratios."""
    t = time.perf_counter()
    jsonl, folder = write_data(work, args.rows, args.shards)
    print(f"data: {args.rows:,} rows, {args.shards} parquet shards + the same rows as JSONL in {work} "
          f"({time.perf_counter() - t:.0f} s to write); {args.ranks} ranks per phase", flush=True)
    cache = os.path.join(work, f"cache-{time.time_ns()}")
    baseline_rows = args.baseline_rows or args.rows
    baseline_path = jsonl
    if baseline_rows < args.rows:
        baseline_path = os.path.join(work, f"train-first-{baseline_rows}.jsonl")
        with open(jsonl) as src, open(baseline_path, "w") as dst:
            for _, line in zip(range(baseline_rows), src):
                dst.write(line)
    phases = [(f"today: JSONL, every rank tokenises into memory ({baseline_rows:,} rows)", "jsonl", baseline_path),
              ("parquet, first start (one rank builds the cache)", "cached", folder),
              ("parquet, cached start (memory-mapped)", "cached", folder)]
    results = []
    for name, mode, path in phases:
        r = phase(mode, path, cache, args.ranks)
        results.append(r)
        per_rank = ", ".join(f"{x['seconds']:.3f} s / {x['rss_mib']:.0f} MiB" for x in r["per_rank"])
        print(f"{name}: slowest rank {r['seconds']:.3f} s, peak RSS {r['rss_mib']:.0f} MiB "
              f"(per rank: {per_rank}; {r['per_rank'][0]['examples']:,} examples, "
              f"{r['per_rank'][0]['tokens']:,} tokens)", flush=True)
    base, first, cached = results
    if baseline_rows < args.rows:   # linear in rows: time, and the memory above the process's start-up
        scale = args.rows / baseline_rows
        floor = cached["rss_mib"]
        base = {"seconds": base["seconds"] * scale, "rss_mib": floor + (base["rss_mib"] - floor) * scale}
        print(f"today's path scaled to {args.rows:,} rows (estimate, linear): {base['seconds']:.0f} s, "
              f"{base['rss_mib']:.0f} MiB per rank")
    else:
        assert base["per_rank"][0]["tokens"] == first["per_rank"][0]["tokens"] == cached["per_rank"][0]["tokens"]
    print(f"ratios vs today: first start {base['seconds'] / first['seconds']:.1f}x faster, "
          f"{base['rss_mib'] / first['rss_mib']:.1f}x less peak RSS; cached start "
          f"{base['seconds'] / max(cached['seconds'], 1e-6):.0f}x faster, {base['rss_mib'] / cached['rss_mib']:.1f}x "
          f"less peak RSS")


if __name__ == "__main__":
    main()
