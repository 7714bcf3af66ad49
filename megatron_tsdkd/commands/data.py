"""``tsdkd-data inspect``: what a data set gives the trainer, before a run: rows, columns, token lengths, drops.

    tsdkd-data inspect PATH --config configs/x.yaml [key=value ...]      # the run's tokenizer, limits and mapping
    tsdkd-data inspect PATH --tokenizer FOLDER [data.fields.prompt=question data.max_length=1024 ...]

PATH is any data format the trainer reads (JSONL, .jsonl.gz, parquet file or folder of shards, .arrow, save_to_disk
folder). The data set is tokenised exactly as the trainer will (the same chat template, limits and column mapping) and
through the same cache (``data.cache_dir``), so inspecting is also the data step of the workflow: the training run
then starts from the memory-mapped cache. Prints the rows read, the column mapping, histograms of prompt and response
lengths in tokens, and the rows dropped or cut for length and why; with matplotlib installed also writes a PNG.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

BAR = 40


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _settings(args):
    """(tokenizer, data config, mode, cache folder) from --config (the run's), or --tokenizer and data.* overrides."""
    from megatron_tsdkd.config import (ConfigError, DataConfig, LoggingConfig, _build, _merge, _parse_override,
                                       load_config)
    from megatron_tsdkd.data.token_cache import resolve_cache_dir
    from megatron_tsdkd.models import ModelError
    from megatron_tsdkd.models.token_spec import load_tokenizer

    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
            data, lam, logging_dir = cfg.data, cfg.rollout.on_policy_prob, cfg.logging.dir
            folder = args.tokenizer or cfg.models.tokenizer
            if not folder:
                from megatron_tsdkd.models.source import resolve_model_source

                folder = resolve_model_source(cfg.models.student.path, cfg.models.student.format).meta_dir
            mode = args.mode or ("on_policy" if lam >= 1.0 else "off_policy")   # as planning/inputs.py decides
        else:
            if not args.tokenizer:
                _fail("give --config (the run's tokenizer and data settings) or --tokenizer FOLDER")
            tree: dict = {}
            for text in args.overrides:
                keys, value = _parse_override(text)
                if keys[0] != "data":
                    raise ConfigError(f"{text}: without --config only data.* keys apply")
                _merge(tree, keys[1:], value)
            data, folder, mode = _build(DataConfig, tree, "data."), args.tokenizer, args.mode or "off_policy"
            logging_dir = LoggingConfig().dir
        return load_tokenizer(folder), data, mode, resolve_cache_dir(data.cache_dir, logging_dir)
    except (ConfigError, ModelError, OSError) as error:
        _fail(str(error))


def _describe(values: np.ndarray) -> str:
    if not len(values):
        return "none"
    q = np.percentile(values, [50, 90, 99])
    return (f"min {values.min()}, mean {values.mean():.1f}, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, "
            f"max {values.max()}")


def text_histogram(values: np.ndarray, bins: int) -> list[str]:
    """One line per bin of whole tokens: its range (inclusive), a bar, the count."""
    if not len(values):
        return []
    low, high = int(values.min()), int(values.max())
    width = max(1, -(-(high - low + 1) // bins))
    counts = np.bincount((values - low) // width)
    digits = len(str(high))
    top = max(int(counts.max()), 1)
    return [f"  {low + i * width:>{digits}}-{min(low + (i + 1) * width - 1, high):<{digits}} "
            f"{'#' * int(round(BAR * c / top)):<{BAR}} {c}" for i, c in enumerate(counts)]


def write_png(path: str, prompt: np.ndarray, response: np.ndarray, bins: int) -> Optional[str]:
    """The two histograms as a PNG, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [(name, v) for name, v in (("prompt", prompt), ("response", response)) if len(v) and v.max() > 0]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(6 * max(len(shown), 1), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], shown):
        ax.hist(values, bins=bins)
        ax.set_xlabel(f"{name} tokens")
        ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _columns(data) -> str:
    f = data.fields
    prompt = repr(f.prompt) if f.prompt else "'prompt', else 'instruction'"
    return (f"prompt <- {prompt} (data.fields.prompt), response <- {f.response!r} (data.fields.response), "
            f"answer <- {f.answer!r} (data.fields.answer), chat <- {f.messages!r} (data.fields.messages)")


def inspect(args) -> None:
    from megatron_tsdkd.data import DataFormatError, load_chat_dataset
    from megatron_tsdkd.data.sources import read_rows, resolve_source

    tokenizer, data, mode, cache_dir = _settings(args)
    try:
        source = resolve_source(args.path)
        first_row = next(iter(read_rows(source)), (None, ""))[0]
        dataset = load_chat_dataset(args.path, tokenizer, mode=mode, max_length=data.max_length,
                                    max_prompt_length=data.max_prompt_length, fields=data.fields,
                                    cache_dir=cache_dir)
    except (DataFormatError, ValueError, OSError) as error:
        _fail(str(error))
    stats = dataset.stats
    prompt, response = dataset.prompt_lengths(), dataset.response_lengths()
    files = f"{len(source.files)} file{'s' if len(source.files) != 1 else ''}"
    print(f"data: {args.path} ({source.kind}, {files}); {stats.read} rows read, {stats.kept} kept ({mode})")
    if isinstance(first_row, dict):
        print(f"columns in the data: {', '.join(sorted(first_row))}")
    print(f"column mapping: {_columns(data)}")
    print(f"length limits: data.max_length {data.max_length}, data.max_prompt_length {data.max_prompt_length}")
    dropped = stats.dropped_long_prompt
    print(f"dropped: {dropped} row{'s' if dropped != 1 else ''} whose prompt alone is longer than "
          f"data.max_prompt_length ({min(data.max_prompt_length, data.max_length - 1)} tokens)"
          + (f", e.g. {', '.join(stats.dropped_sources[:3])}" if stats.dropped_sources else ""))
    print(f"truncated: {stats.truncated_response} response{'s' if stats.truncated_response != 1 else ''} cut to fit "
          f"data.max_length ({stats.response_tokens_removed} tokens removed; a cut response loses its end-of-turn "
          f"token)")
    print(f"prompt tokens: {_describe(prompt)}")
    print("\n".join(text_histogram(prompt, args.bins)))
    if mode == "off_policy":
        print(f"response tokens: {_describe(response)}")
        print("\n".join(text_histogram(response, args.bins)))
    if getattr(dataset, "folder", None):
        print(f"tokenised set: {dataset.folder} (memory-mapped; training with the same settings reads it)")
    png = write_png(args.png, prompt, response if mode == "off_policy" else np.zeros(0), args.bins)
    print(f"histograms: {png}" if png else "histograms: text only (install matplotlib for a PNG)")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "inspect":
        _fail("usage: tsdkd-data inspect PATH [--config YAML | --tokenizer FOLDER] [key=value ...]")
    p = argparse.ArgumentParser(prog="tsdkd-data inspect", description="Rows, column mapping, token-length "
                                "histograms and rows dropped for length, as the trainer reads the data set.")
    p.add_argument("path", help="JSONL(.gz), parquet file or folder of shards, .arrow file, or save_to_disk folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.fields.prompt=question")
    p.add_argument("--config", help="training YAML: its tokenizer and data section (mapping, limits, cache)")
    p.add_argument("--tokenizer", help="tokenizer folder (default with --config: models.tokenizer or the student's)")
    p.add_argument("--mode", choices=("off_policy", "on_policy"),
                   help="responses kept (off_policy) or prompts only (default: as the run decides; else off_policy)")
    p.add_argument("--bins", type=int, default=12, help="histogram bins")
    p.add_argument("--png", default="data_lengths.png", help="where the PNG goes when matplotlib is installed")
    args = p.parse_intermixed_args(argv[1:])
    if not os.path.exists(args.path):
        _fail(f"{args.path} does not exist")
    inspect(args)
