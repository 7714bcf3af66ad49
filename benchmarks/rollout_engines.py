"""Rollout tokens/s of vLLM, our megatron decode and HF transformers generate, same model and prompts, one run; and
the cost of a vLLM weight sync.

    .venv/bin/python benchmarks/rollout_engines.py                      # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/rollout_engines.py --prompts 64 --new-tokens 256 --layers 8
    .venv/bin/python benchmarks/rollout_engines.py --smoke              # tiny, seconds: the suite's check

Why: ``rollout.engine=vllm`` (generation/vllm_replica.py, vllm_rollouts.py) only pays off if vLLM's decode is faster
than ours by more than the weight sync it adds to every step; this prints both figures for one model.

The model: a randomly initialised Qwen2 (default 4 layers, hidden 512, 8 query / 2 KV heads of 64, MLP 1408, a
32,768-token vocabulary), saved as an HF folder in a temporary directory. Megatron loads it (models.build_model +
load_hf_weights) and HF transformers loads it; the vLLM replica starts from dummy weights and gets the megatron
model's through ``VllmRollouts.sync`` (models/weight_stream.py), as in training. Prompts: fixed random ids of
varied lengths; each engine samples ``--new-tokens`` tokens per prompt with the same SamplingConfig (temperature 1,
no top-k / top-p) and no stop id (HF: min_new_tokens = max_new_tokens), and the generated tokens are counted,
not assumed. Every engine runs once as a warm-up, then ``--repeats`` times round robin; the best time counts (the
machine is shared). Every timed call ends in a host read-back of the tokens, so no device synchronisation is
needed. Weight sync: ``weights_changed()`` then ``sync()``, ``--sync-repeats`` times, mean and range.

Device-true: dtype from runtime.device_choices.default_dtype() (fp32 on CPU, bf16 on GPU), the model on
runtime.device(); torch.distributed is started first (a world of one: gloo on CPU, NCCL on GPU), so the replica
runs in vLLM's external-launcher mode, as in training. vLLM's CPU worker binds the process's OpenMP threads when it
starts, so every engine is timed after that, under the same threads. The replica is closed last (vLLM's shutdown
destroys the default process group).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.generation import SamplingConfig, generate  # noqa: E402

PAD = 0


def save_random_qwen2(args, folder: str) -> None:
    """A random Qwen2 at the benchmark's shapes as an HF folder (fp32 safetensors; each engine casts)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def load_megatron(folder: str, dtype: torch.dtype, attention: str):
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    config = read_hf_config(folder)
    model = build_model(config, params_dtype=dtype, attention_backend=attention, perform_initialization=False)
    load_hf_weights(model, folder, config)
    return model.eval(), config


def hf_generate(model, prompts, config: SamplingConfig, device) -> int:
    """HF generate on the left-padded batch with ``config``'s sampling settings; the number of generated tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not config.greedy,
                             temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                             max_new_tokens=config.max_new_tokens, min_new_tokens=config.max_new_tokens,
                             pad_token_id=PAD)
    new = out[:, width:].cpu()   # the host read-back that ends the timed call
    return new.shape[0] * new.shape[1]   # min_new_tokens: every row has every column


# --smoke (tests/test_benchmarks.py keeps the script alive): one layer, head_dim 64 (vLLM's CPU minimum), 2 prompts
SMOKE = dict(prompts=2, min_prompt=4, max_prompt=8, new_tokens=4, layers=1, hidden=128, heads=2, kv_heads=1,
             intermediate=128, vocab=512, repeats=1, sync_repeats=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=32, help="shortest prompt (tokens)")
    p.add_argument("--max-prompt", type=int, default=128, help="longest prompt (tokens)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="query heads; head_dim = hidden / heads (vLLM's CPU "
                                                         "attention needs 64 or more)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (round robin); the best counts")
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--attention", default="auto", help="megatron attention backend (auto: as training picks)")
    p.add_argument("--vllm-memory-fraction", type=float, default=0.3, help="the replica's GPU share (GPU only)")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = p.parse_args(argv)
    if args.smoke:   # explicit flags still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import vllm
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.generation.vllm_replica import VllmReplica
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts
    from megatron_tsdkd.models import arch_spec
    from megatron_tsdkd.models.attention import resolve_attention_backend
    from megatron_tsdkd.models.weight_stream import stream_hf_tensors
    from megatron_tsdkd.runtime import device, init_distributed
    from megatron_tsdkd.runtime.device_choices import default_dtype, device_kind

    init_distributed()   # first: the replica then joins this world (external launcher), as in training
    dtype, dev = default_dtype(), device()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(3, args.vocab, (n,), generator=gen).tolist() for n in lengths]
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature)
    warm = SamplingConfig(max_new_tokens=2, temperature=args.temperature)

    with tempfile.TemporaryDirectory(prefix="rollout_engines_") as folder:
        save_random_qwen2(args, folder)
        megatron, hf_config = load_megatron(folder, dtype, args.attention)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
        started = time.perf_counter()
        replica = VllmReplica(folder, dtype=dtype, vocab_size=args.vocab, max_model_len=args.max_prompt
                              + args.new_tokens, max_rows=args.prompts, memory_fraction=args.vllm_memory_fraction)
        start_s = time.perf_counter() - started
        spec = arch_spec(hf_config)
        rollouts = VllmRollouts(replica, lambda: stream_hf_tensors(megatron, spec), (),
                                group=ps.get_model_parallel_group())
        seeds = list(range(args.prompts))

        def run_vllm(cfg):
            return sum(len(r) for r in replica.generate(prompts, cfg, eos_token_ids=(), seeds=seeds).responses)

        def run_megatron(cfg):
            out = generate(megatron, prompts, cfg, eos_token_ids=(), pad_token_id=PAD, vocab_size=args.vocab,
                           generator_seed=5)
            return sum(len(r) for r in out.responses)

        engines = {f"vLLM {vllm.__version__} (VllmReplica)": run_vllm,
                   "megatron decode (KV cache)": run_megatron,
                   "HF transformers generate": lambda cfg: hf_generate(hf, prompts, cfg, dev)}

        # warm-up: the first rollout also loads the megatron weights into the replica (its first sync)
        _, first_sync = rollouts.generate(prompts, warm, generator_seed=0)
        syncs = []
        for _ in range(args.sync_repeats):   # the last sync leaves the replica awake with the current weights
            rollouts.weights_changed()
            syncs.append(rollouts.sync())
        for run in engines.values():
            run(warm)
        best, tokens = {name: math.inf for name in engines}, {}
        for _ in range(args.repeats):
            for name, run in engines.items():
                began = time.perf_counter()
                tokens[name] = run(config)
                best[name] = min(best[name], time.perf_counter() - began)

        rate = {name: tokens[name] / best[name] for name in engines}
        v, m, h = (rate[name] for name in engines)
        vllm_s = best[next(iter(engines))]
        sync_mean = sum(syncs) / len(syncs)
        head_dim = args.hidden // args.heads
        print(f"model: Qwen2, {args.layers} layers, hidden {args.hidden}, {args.heads} query / {args.kv_heads} KV "
              f"heads (head_dim {head_dim}), MLP {args.intermediate}, vocab {args.vocab}, "
              f"{str(dtype).replace('torch.', '')}, random weights; megatron attention "
              f"{resolve_attention_backend(args.attention)}; {device_kind()}, {torch.get_num_threads()} threads")
        print(f"prompts: {args.prompts} of {min(lengths)}-{max(lengths)} tokens; {args.new_tokens} new tokens each, "
              f"sampled at temperature {config.temperature} (top-k {config.top_k}, top-p {config.top_p}), no stop "
              f"id; best of {args.repeats} after a warm-up; vLLM start {start_s:.1f} s")
        print(f"{'engine':<30} {'tokens':>7} {'seconds':>8} {'tokens/s':>10}")
        for name in engines:
            print(f"{name:<30} {tokens[name]:>7} {best[name]:>8.3f} {rate[name]:>10.1f}")
        print(f"rollout engines: tokens/s vLLM {v:.1f}, megatron {m:.1f}, HF {h:.1f}; "
              f"vLLM / megatron {v / m:.2f}x, vLLM / HF {v / h:.2f}x")
        print(f"rollout engines: weight sync (VllmRollouts.sync after weights_changed) {sync_mean:.3f} s mean of "
              f"{len(syncs)} ({min(syncs):.3f}-{max(syncs):.3f} s; first load {first_sync:.3f} s) = "
              f"{sync_mean / vllm_s:.2f}x one vLLM rollout ({vllm_s:.3f} s)")
        rollouts.close()   # last: vLLM's shutdown destroys the default process group


if __name__ == "__main__":
    main()
