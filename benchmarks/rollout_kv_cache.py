"""Tokens/s of KV-cached generation against re-running the whole sequence for every new token, same model, one run.

    .venv/bin/python benchmarks/rollout_kv_cache.py --new-tokens 128
    .venv/bin/python benchmarks/rollout_kv_cache.py --smoke     # tiny sizes, seconds: the suite's check

A randomly initialised Qwen2-style model (RMSNorm, SwiGLU, GQA, qkv bias, rope) built by megatron_tsdkd.models in a
world of one; greedy decoding with no end-of-turn token, so both variants produce exactly batch x new-tokens
tokens, and their outputs are checked to be identical before the ratio is printed. Each variant runs once after
a short warm-up; the machine is shared, so use --threads to match what you can have.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.generation import SamplingConfig, generate  # noqa: E402


def build(args):
    from transformers import Qwen2Config

    from megatron_tsdkd.models import build_model

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096)
    torch.manual_seed(0)
    return build_model(config), config


def timed_generate(model, prompts, config, vocab_size: int, use_kv_cache: bool):
    start = time.perf_counter()
    out = generate(model, prompts, config, eos_token_ids=[], pad_token_id=0, vocab_size=vocab_size,
                   use_kv_cache=use_kv_cache)
    return out, time.perf_counter() - start


SMOKE = dict(hidden=128, layers=1, vocab=512, batch=2, prompt_len=16, new_tokens=8)   # tests/test_benchmarks.py


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = parser.parse_args(argv)
    if args.smoke:   # explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_tsdkd.runtime import init_distributed

    init_distributed()
    model, hf_config = build(args)
    gen = torch.Generator().manual_seed(1)
    # Prompts of different lengths (up to --prompt-len), as rollouts have.
    prompts = [torch.randint(3, args.vocab, (args.prompt_len - 7 * i,), generator=gen).tolist()
               for i in range(args.batch)]
    config = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
    timed_generate(model, prompts, SamplingConfig(max_new_tokens=4, greedy=True), args.vocab, True)  # warm-up

    cached, cached_s = timed_generate(model, prompts, config, args.vocab, use_kv_cache=True)
    full, full_s = timed_generate(model, prompts, config, args.vocab, use_kv_cache=False)
    if cached.responses != full.responses:
        raise SystemExit("KV-cached and recomputed generation disagree; the timing would compare different work")
    tokens = sum(len(r) for r in cached.responses)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch}, "
          f"prompts <= {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.threads} thread(s)")
    print(f"KV cache:    {tokens / cached_s:9.1f} tokens/s ({cached_s:.2f} s)")
    print(f"full re-run: {tokens / full_s:9.1f} tokens/s ({full_s:.2f} s)")
    print(f"speed-up:    {full_s / cached_s:.2f}x")


if __name__ == "__main__":
    main()
