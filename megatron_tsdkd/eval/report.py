"""Results of a ``tsdkd-eval --tasks`` run on disk, and the side-by-side comparison of several runs.

A run folder (``--output DIR``) holds ``results.json`` (lm-eval's results per task and group, the headline metric
per task, the command line, generation settings, chat template, seeds and package versions), ``results.md``
(the headline table) and ``samples_<task>.jsonl`` (every document's prompt, generation or scores, and metrics).
``tsdkd-eval --compare RUN_A RUN_B ...`` reads those folders and prints the paper-style table (one column per run,
one row per task, the average last), also written as ``compare.md`` / ``compare.csv`` (and ``compare.png`` when
matplotlib is installed; it is not a dependency) into ``--output``.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

# The metric a task's row shows, first present wins (lm-eval reports several per task).
HEADLINE = ("exact_match,strict-match", "exact_match,custom-extract", "exact_match,get-answer", "acc_norm,none",
            "acc,none", "exact_match,none", "pass_at_1,none", "prompt_level_strict_acc,none")


def headline(metrics: dict) -> Optional[tuple[str, float]]:
    for key in HEADLINE:
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    for key, value in metrics.items():
        if "," in key and "stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    return None


def headline_scores(results: dict, names: list[str]) -> dict[str, dict]:
    scores = {}
    for name in names:
        found = headline(results.get("groups", {}).get(name) or results["results"].get(name, {}))
        if found:
            scores[name] = {"metric": found[0], "score": found[1]}
    return scores


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("megatron-tsdkd", "lm-eval", "megatron-core", "torch", "transformers", "datasets"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{100 * v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run(results: dict, names: list[str], args, lm) -> str:
    """Write the run folder (when ``args.output``) and return the markdown table (scores in %)."""
    scores = headline_scores(results, names)
    rows = [[name, scores[name]["metric"], scores[name]["score"]] for name in names if name in scores]
    if rows:
        rows.append(["average", "", sum(r[2] for r in rows) / len(rows)])
    table = markdown_table(["task", "metric", "score (%)"], rows)
    if not args.output:
        return table
    os.makedirs(args.output, exist_ok=True)
    record = {
        "model": args.model, "tasks": names, "headline": scores, "results": results.get("results"),
        "groups": results.get("groups"), "n-samples": results.get("n-samples"), "configs": results.get("configs"),
        "settings": {"tp": args.tp, "pp": args.pp, "dtype": args.dtype, "limit": args.limit,
                     "num_fewshot": args.num_fewshot, "apply_chat_template": args.apply_chat_template,
                     "max_length": args.max_length, "max_gen_toks": args.max_new_tokens,
                     "batch_size": args.batch_size, "seed": args.seed, "data_dir": args.data_dir,
                     "generation": "greedy unless a task's gen_kwargs set do_sample (then its temperature/top_p/"
                                   "top_k, generator seed = seed + call index)"},
        "chat_template": lm.chat_template(True) if args.apply_chat_template else None,
        "versions": _versions(),
    }
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(record, f, indent=1, default=_json_default)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table + "\n")
    for task, samples in (results.get("samples") or {}).items():
        with open(os.path.join(args.output, f"samples_{task}.jsonl"), "w") as f:
            for sample in samples:
                f.write(json.dumps(sample, default=_json_default) + "\n")
    return table


def compare_runs(runs: list[str], output: Optional[str] = None) -> str:
    """The side-by-side markdown table of ``runs`` (folders with results.json); CSV/PNG too into ``output``."""
    loaded = []
    for run in runs:
        path = os.path.join(run, "results.json")
        if not os.path.isfile(path):
            raise ValueError(f"{run} has no results.json (write one with tsdkd-eval --tasks ... --output {run})")
        with open(path) as f:
            loaded.append(json.load(f)["headline"])
    tasks = list(dict.fromkeys(t for scores in loaded for t in scores))
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    rows = [[t] + [s[t]["score"] if t in s else None for s in loaded] for t in tasks]
    averages = []
    for column in range(len(runs)):
        values = [row[column + 1] for row in rows if row[column + 1] is not None]
        averages.append(sum(values) / len(values) if values and len(values) == len(tasks) else None)
    rows.append(["average"] + averages)
    table = markdown_table(["task"] + names, rows)
    if output:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "compare.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(output, "compare.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task"] + names)
            for row in rows:
                writer.writerow([row[0]] + ["" if v is None else f"{100 * v:.2f}" for v in row[1:]])
        _bar_chart(rows, names, os.path.join(output, "compare.png"))
    return table


def _bar_chart(rows, names, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar([i + k * width for i in range(len(rows))], [100 * (r[k + 1] or 0) for r in rows], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r[0] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
