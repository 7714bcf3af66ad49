"""Decoding without per-token host syncs (issue 18): the stop check every ``stop_check_interval`` tokens gives the
responses of a check at every token; sampling never calls torch.multinomial (host-side validation) and draws
from the right law (tests/test_generation.py's chi-square tests); masked GQA attention folds heads instead of
repeating the KV cache and equals the repeated-heads reference."""
from __future__ import annotations

import math

import pytest
import torch
from harness import run_serial
from tiny_models import VOCAB_SIZE, make_tiny_hf_model

from megatron_tsdkd.models.attention import sdpa_attention

PROMPTS = [[5, 17, 33, 9, 100, 250, 31], [7, 8], [42, 43, 44, 45, 46], [3]]
MAX_NEW, PAD = 24, 0
READBACKS = ("__bool__", "item", "tolist", "__int__", "__float__")


def _decode_runs(path: str) -> dict:
    """Per stop_check_interval and sampling mode: the responses and how often decode read a tensor back to the
    host (Tensor.__bool__/item/tolist/int/float calls counted inside ``decode``; torch.multinomial forbidden)."""
    from megatron_tsdkd.generation import SamplingConfig
    from megatron_tsdkd.generation.generate import decode
    from megatron_tsdkd.generation.token_selection import select_tokens
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    config = read_hf_config(path)
    model = build_model(config, perform_initialization=False, attention_backend="sdpa")
    load_hf_weights(model, path, config)
    greedy = decode([model], PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, greedy=True),
                    lambda logits, done: select_tokens(logits[0], SamplingConfig(greedy=True), VOCAB_SIZE, None),
                    eos_token_ids=(), pad_token_id=PAD, vocab_size=VOCAB_SIZE)[0]
    # stop tokens that end the rows at different steps before MAX_NEW: each greedy row's 3rd token, and a fifth
    # of the vocabulary for the sampled rows
    eos = sorted({int(row[2]) for row in greedy} | set(range(50, 50 + VOCAB_SIZE // 5)))

    counts = {}
    originals = {name: getattr(torch.Tensor, name) for name in READBACKS}

    nested = []

    def counting(name):
        def call(self, *args, **kwargs):
            if not nested:   # one read-back may go through several of these methods: count the outermost
                counts[name] = counts.get(name, 0) + 1
            nested.append(name)
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                nested.pop()
        return call

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.multinomial validates probabilities on the host")

    out = {}
    multinomial = torch.multinomial
    for mode, sampling in (("greedy", dict(greedy=True)), ("sampled", dict(temperature=1.2, top_k=50, num_samples=2))):
        for interval in (1, 5, 16):
            cfg = SamplingConfig(max_new_tokens=MAX_NEW, stop_check_interval=interval, **sampling)
            generator = torch.Generator().manual_seed(7)
            counts.clear()
            for name in READBACKS:
                setattr(torch.Tensor, name, counting(name))
            torch.multinomial = forbidden
            try:
                tokens, lengths, done, _ = decode(
                    [model], PROMPTS, cfg, lambda logits, done: select_tokens(logits[0], cfg, VOCAB_SIZE, generator),
                    eos_token_ids=eos, pad_token_id=PAD, vocab_size=VOCAB_SIZE)
            finally:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, fn)
                torch.multinomial = multinomial
            out[mode, interval] = {"tokens": tokens.tolist(), "lengths": lengths.tolist(), "done": done.tolist(),
                                   "readbacks": dict(counts)}
    return out


@pytest.fixture(scope="module")
def decode_runs(tmp_path_factory):
    path = make_tiny_hf_model("qwen2", str(tmp_path_factory.mktemp("decode") / "qwen2"), seed=3)
    return run_serial(_decode_runs, path)


def test_sparse_stop_checks_give_the_same_responses_with_fewer_syncs(decode_runs):
    for mode in ("greedy", "sampled"):
        every = decode_runs[mode, 1]
        lengths = every["lengths"]
        assert all(every["done"]) and len(set(lengths)) > 1 and max(lengths) < MAX_NEW, (mode, lengths)
        steps = max(lengths)   # checking every token, the loop ends right after the last row's stop token
        assert every["readbacks"] == {"__bool__": steps}, (mode, every["readbacks"])
        for interval in (5, 16):
            run = decode_runs[mode, interval]
            assert run["tokens"] == every["tokens"] and run["lengths"] == lengths and run["done"] == every["done"]
            assert run["readbacks"] == {"__bool__": math.ceil(steps / interval)}, (mode, interval, run["readbacks"])


# ---------------------------------------------------------------------------------------------------------------
# Masked GQA without repeated keys and values

def _repeated_heads_reference(q, k, v, mask):
    """softmax(q k^T / sqrt(hn) with megatron's -10000 at masked scores) v, keys/values repeated to every head."""
    sq, b, heads, hn = q.shape
    rep = heads // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2).float() for t in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q.float(), k) / math.sqrt(hn)
    scores = scores.masked_fill(mask, -10000.0)
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v).reshape(sq, b, heads * hn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_gqa_folds_heads_instead_of_repeating_kv(monkeypatch, dtype):
    """Decode (one query) and prefill (causal + left padding) masks, shared by all heads or one per head: equal to
    the repeated-heads reference, and Tensor.repeat_interleave is never called."""
    g = torch.Generator().manual_seed(0)
    b, heads, groups, hn, sk = 3, 8, 2, 16, 11
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    k, v = (torch.randn(sk, b, groups, hn, generator=g).to(dtype) for _ in range(2))
    padding = torch.zeros(b, sk, dtype=torch.bool)
    padding[1, :4] = True
    padding[2, :1] = True
    causal = torch.ones(sk, sk, dtype=torch.bool).triu(1)
    cases = {
        "decode, shared": (1, padding[:, None, None, :]),
        "decode, per head": (1, padding[:, None, None, :] | (torch.rand(b, heads, 1, sk, generator=g) < 0.2)),
        "prefill, shared": (sk, causal[None, None] | padding[:, None, None, :]),
        "prefill, per head": (sk, causal[None, None] | padding[:, None, None, :]
                              | (torch.rand(b, heads, sk, sk, generator=g) < 0.2)),
        "broadcast batch": (sk, causal[None, None]),
    }

    def no_repeat(*args, **kwargs):
        raise AssertionError("masked GQA repeated the keys and values")

    for name, (sq, mask) in cases.items():
        q = torch.randn(sq, b, heads, hn, generator=g).to(dtype)
        expected = _repeated_heads_reference(q, k, v, mask.expand(b, heads, sq, sk))
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
            got = sdpa_attention(q, k, v, mask, causal=True, scale=1.0 / math.sqrt(hn))
        assert got.dtype == dtype and got.shape == (sq, b, heads * hn)
        real = ~mask.expand(b, heads, sq, sk).all(-1).any(1).T   # [sq, b]: queries with at least one key
        assert (got.float()[real] - expected[real]).abs().max() <= tol, name
