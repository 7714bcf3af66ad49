"""Decode tokens/s before and after issue 18's decode changes, same model and prompts, in one run.

    .venv/bin/python benchmarks/decode_syncs.py                       # Qwen2.5-7B attention shapes, 2 layers, CPU
    .venv/bin/python benchmarks/decode_syncs.py --batch 16 --prompt-len 1024 --new-tokens 128
    .venv/bin/python benchmarks/decode_syncs.py --smoke     # tiny sizes, seconds: the suite's check

The changes (generation/generate.py decode, generation/token_selection.py draw, models/attention.py):
- stop check: ``bool(done.all())`` every ``rollout.stop_check_interval`` tokens (16) instead of every token;
- sampling: the exponential race on the device instead of torch.multinomial (which validates on the host);
- masked GQA: query heads folded onto their KV group instead of repeat_interleave of the whole KV cache to every
  head, per layer, per token (left-padded prompts always carry a mask).

"before" is the old code reconstructed in this script: stop_check_interval=1, ``token_selection.draw`` replaced by
torch.multinomial and ``attention.sdpa_attention`` replaced by the old one, whose masked GQA path repeated the keys
and values before SDPA; each change is also reverted alone (the script stops if a replaced function is never
called: the swap would have measured nothing). A randomly initialised Qwen2-style model with Qwen2.5-7B's attention
(hidden 3584, 28 query heads, 4 KV groups, head_dim 128) but a small MLP and vocabulary and few layers, so a CPU can
run it; attention and the KV cache are at real width. Sampling at temperature 1 with no end-of-turn token, so every
variant produces batch x new-tokens tokens; greedy outputs of before and after are checked to be identical first.
Every variant runs ``--repeats`` times (round robin) after one warm-up; the best time counts (the machine is shared).

On a CPU a host sync costs nothing (there is no asynchronous queue to drain), so the stop-check and sampling rows
show no CPU gain; the script prints how many host read-backs the stop check makes instead. On a GPU each one
stalls the launch queue once per token.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megatron_tsdkd.generation.token_selection as token_selection  # noqa: E402
import megatron_tsdkd.models.attention as attention  # noqa: E402
from megatron_tsdkd.generation import SamplingConfig, generate  # noqa: E402

CALLS = collections.Counter()   # calls of the old code, so a swap that no longer takes effect is caught


def multinomial_draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The old sampler: torch.multinomial (host-side validation of the probabilities)."""
    CALLS["sampler"] += 1
    return torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)


def repeated_kv_sdpa_attention(query, key, value, attention_mask, *, causal, scale, dropout_p=0.0):
    """The old ``attention.sdpa_attention`` (same arguments): with a mask and GQA, every KV group repeated to each
    of its query heads, then SDPA; otherwise today's path, which that change left alone."""
    sq, b, heads, hn = query.shape
    if attention_mask is None or key.shape[2] == heads:
        return NEW_SDPA_ATTENTION(query, key, value, attention_mask, causal=causal, scale=scale, dropout_p=dropout_p)
    CALLS["gqa"] += 1
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, hn]
    additive = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
    additive.masked_fill_(attention_mask.to(q.device), attention.MASKED_SCORE)
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p,
                                                           scale=scale)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


NEW_SDPA_ATTENTION = attention.sdpa_attention


@contextlib.contextmanager
def old(sampler: bool, gqa: bool):
    saved = token_selection.draw, attention.sdpa_attention
    if sampler:
        token_selection.draw = multinomial_draw
    if gqa:
        attention.sdpa_attention = repeated_kv_sdpa_attention
    try:
        yield
    finally:
        token_selection.draw, attention.sdpa_attention = saved


def build(args):
    from transformers import Qwen2Config

    from megatron_tsdkd.models import build_model

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=8192)
    torch.manual_seed(0)
    return build_model(config, attention_backend="sdpa")


# name -> (old stop check, old sampler, old masked GQA)
VARIANTS = {"before": (True, True, True), "after": (False, False, False), "old stop check only": (True, False, False),
            "old sampler only": (False, True, False), "old GQA only": (False, False, True)}


# --smoke (tests/test_benchmarks.py): tiny, but still GQA (2 query heads of 64 per KV group) with left padding
SMOKE = dict(hidden=256, heads=4, kv_heads=2, intermediate=128, layers=1, vocab=512, batch=2, prompt_len=16,
             new_tokens=4, repeats=1, threads=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512, help="longest prompt; the others are shorter (left padding)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = p.parse_args(argv)
    if args.smoke:   # explicit flags still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron_tsdkd.runtime import init_distributed

    init_distributed()
    model = build(args)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (max(1, args.prompt_len - 37 * i),), generator=gen).tolist()
               for i in range(args.batch)]

    def run(variant: str, greedy: bool, new_tokens: int):
        stop, sampler, gqa = VARIANTS[variant]
        config = SamplingConfig(max_new_tokens=new_tokens, greedy=greedy, temperature=1.0,
                                stop_check_interval=1 if stop else SamplingConfig.stop_check_interval)
        with old(sampler, gqa):
            start = time.perf_counter()
            out = generate(model, prompts, config, eos_token_ids=[], pad_token_id=0, vocab_size=args.vocab,
                           generator_seed=5)
            return out, time.perf_counter() - start

    check = min(args.new_tokens, 8)
    if run("before", True, check)[0].responses != run("after", True, check)[0].responses:
        raise SystemExit("greedy outputs differ between the old and the new decode path")
    for variant in VARIANTS:
        run(variant, False, 2)   # warm-up
    seconds = {variant: math.inf for variant in VARIANTS}
    for _ in range(args.repeats):   # round robin: a burst of load on the shared machine hits every variant alike
        for variant in VARIANTS:
            seconds[variant] = min(seconds[variant], run(variant, False, args.new_tokens)[1])
    if not (CALLS["sampler"] and CALLS["gqa"]):   # the decode no longer calls what "before" replaces
        raise SystemExit(f"the old code was never called ({dict(CALLS)}): before would measure today's path")
    tokens = args.batch * args.new_tokens
    heads, groups, hd = args.heads, args.kv_heads, args.hidden // args.heads
    kv = 2 * args.batch * (args.prompt_len + args.new_tokens) * groups * hd * 4
    print(f"model: hidden {args.hidden}, {heads} query heads / {groups} KV groups (head_dim {hd}), MLP "
          f"{args.intermediate}, {args.layers} layers, vocab {args.vocab}, fp32, sdpa; batch {args.batch}, prompts "
          f"<= {args.prompt_len} tokens (left-padded), {args.new_tokens} new tokens sampled, {args.threads} threads")
    print(f"greedy outputs of before and after: identical ({check} tokens x {args.batch} rows)")
    for variant, s in seconds.items():
        print(f"  {variant:<20} {tokens / s:9.1f} tokens/s  ({s:.2f} s)")
    print(f"  after / before:      {seconds['before'] / seconds['after']:.2f}x")
    print(f"host read-backs of the stop check per decode: before {args.new_tokens}, after "
          f"{math.ceil(args.new_tokens / SamplingConfig.stop_check_interval)} (every "
          f"{SamplingConfig.stop_check_interval} tokens); KV repeat avoided per layer per token at the last step: "
          f"{kv * (heads // groups - 1) / 2**20:.0f} MiB (fp32; the cache holds {kv / 2**20:.0f} MiB per layer)")


if __name__ == "__main__":
    main()
