"""Pick the next token of every row from the last position's full-vocabulary logits [b, V_padded].

The logits arrive gathered over TP: megatron-core 0.16's GPTModel asserts ``runtime_gather_output`` whenever an
inference context is passed ("Inference must always gather TP logits"), so the output layer all-gathers the one
new position (b x V values per step, e.g. 64 x 152k bf16 = 19 MB) and every TP rank holds the same logits. That
also makes exact top-k/top-p possible (top-p needs a sort over the whole vocabulary) and the result
independent of the TP size. Vocabulary padding (ids >= ``vocab_size``) is cut off first, so it can never be
chosen. Written by hand (small): megatron-core's sampler lives inside its CUDA-oriented text generation
controller and cannot be called on its own.
"""
from __future__ import annotations

import torch

from megatron_tsdkd.generation.sampling_config import SamplingConfig


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` with tokens outside the top-k, then outside the top-p nucleus, set to -inf (the most likely
    token always survives)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p   # keep tokens until the mass before them reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One id per row of ``probs`` [b, V] (non-negative, rows need not sum to 1), drawn with ``generator``,
    entirely on the device: the exponential race argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability
    p_i / sum(p) (the minimum of independent Exp(p_i) clocks E_i / p_i). ``torch.multinomial`` would draw the
    same law but validates the probabilities on the host (a sync per call on GPU). Zero-probability ids score 0
    and never beat a positive one."""
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    return (probs.float() / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def sample_from_logits(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Ids [b] drawn from full-vocabulary logits [b, V] with temperature, top-k and top-p; deterministic given
    the generator's state."""
    logits = filter_top_k_top_p(logits.float() / config.temperature, config.top_k, config.top_p)
    return draw(logits.softmax(dim=-1), generator)


def log_probs_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] per row, in fp32: ``logits`` [b, V] (the real vocabulary), ``ids`` [b]."""
    return logits.float().log_softmax(dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)


def select_tokens(logits: torch.Tensor, config: SamplingConfig, vocab_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Next ids [b] from full-vocabulary logits [b, V_padded]: the first maximum when greedy, else a draw."""
    real = logits[:, :vocab_size]
    if config.greedy:
        return real.argmax(dim=-1)
    return sample_from_logits(real, config, generator)
