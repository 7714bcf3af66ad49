"""Batches of token ids and response masks, for training and for on-policy generation.

The convention every loss relies on (and the only one in this project)::

    labels[b, t]    = input_ids[b, t + 1]          (input_ids shifted left by one; the last column is padding)
    logits[b, t]    scores labels[b, t]            (the model's output at position t predicts the next token)
    loss_mask[b, t] = 1.0 iff labels[b, t] is a response token (the end-of-turn token included), else 0.0

So for a row with P prompt tokens and R response tokens, ``loss_mask[b, P-1 : P+R-1] = 1``: the last prompt position
predicts the first response token, the second-to-last response position predicts the end-of-turn token. Prompt
targets and padding are 0. Training rows are right-padded: with causal attention the padding only follows the real
tokens, so no attention mask is needed and position ids are plain ``0..L-1``. Prompt batches for generation are
left-padded by default (every row's last prompt token in the last column), with an attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Optional, Sequence, Union

import torch

from megatron_tsdkd.losses.inputs import Targets

from .chat_tokenization import TokenizedExample

IdRows = Sequence[Sequence[int]]


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor         # [B, L] long, right-padded
    labels: torch.Tensor            # [B, L] long, input_ids shifted left by one
    loss_mask: torch.Tensor         # [B, L] float, 1.0 on response targets
    position_ids: torch.Tensor      # [B, L] long
    prompt_lengths: torch.Tensor    # [B] long
    lengths: torch.Tensor           # [B] long, prompt + response tokens
    # [B, L] float: on response targets, the log-probability the rollout engine gave that token when it sampled it
    # (GenerationOutput.logprobs); 0 elsewhere. None for data not sampled by the student (off-policy steps).
    rollout_logprobs: Optional[torch.Tensor] = None
    # loss_mask's targets found on the host while collating (positions, label range: losses/inputs.py), so the
    # losses read nothing back from the device; None (a batch built by hand) lets them read the mask instead.
    targets: Optional[Targets] = None

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})


@dataclass
class PromptBatch:
    input_ids: torch.Tensor         # [B, P] long
    attention_mask: torch.Tensor    # [B, P] long, 1 on real tokens
    lengths: torch.Tensor           # [B] long
    padding_side: str

    def prompts(self) -> list[list[int]]:
        """The unpadded prompt ids of every row."""
        rows = []
        for row, mask in zip(self.input_ids.tolist(), self.attention_mask.tolist()):
            rows.append([token for token, keep in zip(row, mask) if keep])
        return rows


def _padded_length(longest: int, pad_to: Optional[int], multiple_of: int) -> int:
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence in the batch ({longest} tokens)")
    return -(-length // multiple_of) * multiple_of


def response_weights(examples: Sequence[TokenizedExample]) -> Optional[list[list[float]]]:
    """The examples' float per-response-token loss weights (``WeightedExample``), 1.0 for unweighted ones; None
    when no example is weighted (then every target weighs 1)."""
    if not any(getattr(e, "response_weights", None) is not None for e in examples):
        return None
    return [list(e.response_weights) if getattr(e, "response_weights", None) is not None
            else [1.0] * len(e.response_ids) for e in examples]


def collate_training(examples: Sequence[Union[TokenizedExample, tuple]], pad_id: int, pad_to: Optional[int] = None,
                     pad_to_multiple_of: int = 1,
                     logprobs: Optional[Sequence[Sequence[float]]] = None) -> TrainingBatch:
    """(prompt ids, response ids[, response weights]) tuples or ``TokenizedExample``s -> a right-padded
    ``TrainingBatch``. Response weights (floats, one per response token) become ``loss_mask`` values as they are;
    without them every response target weighs 1.0. ``logprobs``: the rollout engine's log-probability of each
    response token, one row per example (``TrainingBatch.rollout_logprobs``)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    rows = [(e.prompt_ids, e.response_ids, getattr(e, "response_weights", None)) if isinstance(e, TokenizedExample)
            else (e[0], e[1], e[2] if len(e) > 2 else None) for e in examples]
    lengths = [len(p) + len(r) for p, r, _ in rows]
    if any(len(p) == 0 for p, _, _ in rows):
        raise ValueError("every example needs at least one prompt token")
    width = _padded_length(max(lengths), pad_to, pad_to_multiple_of)
    input_ids = torch.full((len(rows), width + 1), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    positions, labels = [], []   # the targets (mask != 0), row-major, and their labels: the response tokens
    for row, (prompt, response, weights) in enumerate(rows):
        ids = list(prompt) + list(response)
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        if weights is None:
            loss_mask[row, len(prompt) - 1:len(ids) - 1] = 1.0
        else:
            if len(weights) != len(response):
                raise ValueError(f"row {row}: {len(weights)} response weights for {len(response)} response tokens")
            loss_mask[row, len(prompt) - 1:len(ids) - 1] = torch.tensor(list(weights), dtype=torch.float32)
        kept = [j for j in range(len(response)) if weights is None or weights[j] != 0]
        positions += [row * width + len(prompt) - 1 + j for j in kept]
        labels += [int(response[j]) for j in kept]
    rollout_logprobs = None
    if logprobs is not None:
        if len(logprobs) != len(rows):
            raise ValueError(f"{len(logprobs)} log-probability rows for {len(rows)} examples")
        rollout_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for row, ((prompt, response, _), scores) in enumerate(zip(rows, logprobs)):
            if len(scores) != len(response):
                raise ValueError(f"row {row}: {len(scores)} log-probabilities for {len(response)} response tokens")
            rollout_logprobs[row, len(prompt) - 1:len(prompt) + len(response) - 1] = torch.tensor(
                list(scores), dtype=torch.float32)
    return TrainingBatch(
        input_ids=input_ids[:, :width].contiguous(),
        labels=input_ids[:, 1:].contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(width, dtype=torch.long).expand(len(rows), width).contiguous(),
        prompt_lengths=torch.tensor([len(p) for p, _, _ in rows], dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
        rollout_logprobs=rollout_logprobs,
        targets=Targets(torch.tensor(positions, dtype=torch.long), (len(rows), width),
                        (min(labels), max(labels)) if labels else (0, 0)),
    )


def micro_batches(pairs: Sequence[tuple], micro_size: int, pad_id: int, max_length: int,
                  device=None, weights: Optional[Sequence[Sequence[float]]] = None,
                  sort_by_length: bool = False,
                  logprobs: Optional[Sequence[Sequence[float]]] = None) -> tuple[list[TrainingBatch], int]:
    """One optimizer step's (prompt, response) pairs -> micro-batches of ``micro_size`` rows, each right-padded to
    ITS OWN longest row, and the longest width of the step. Responses are cut so a row holds at most ``max_length``
    tokens. ``weights``: optional float loss weights per response token of each pair, cut with their responses;
    ``logprobs``: optional rollout log-probabilities per response token (``TrainingBatch.rollout_logprobs``), alike.

    Micro-batches of different widths are what the trainer's schedule expects: at PP > 1 the co-located stage
    asks megatron-core for variable sequence lengths (engines/megatron/colocation.py), which sends each activation's shape
    ahead of it. Padding only follows a row's real tokens (causal attention, right padding), so a row's numbers do
    not depend on the width it is padded to. ``sort_by_length`` sorts the step's rows by length before cutting,
    so rows of similar length share a micro-batch (less padding still); the trainer's per-token normalisation
    keeps token-decomposable losses unchanged, but per-micro-batch quantities (TSD-KD's entropy set and opener)
    see other neighbours."""
    for name, rows in (("weight", weights), ("log-probability", logprobs)):
        if rows is not None and len(rows) != len(pairs):
            raise ValueError(f"{len(rows)} {name} rows for {len(pairs)} pairs")
    cut = [max(max_length - len(p), 0) for p, _ in pairs]
    if weights is None:
        pairs = [(p, list(r)[:c]) for (p, r), c in zip(pairs, cut)]
    else:
        pairs = [(p, list(r)[:c], list(w)[:c]) for (p, r), w, c in zip(pairs, weights, cut)]
    scores = None if logprobs is None else [list(s)[:c] for s, c in zip(logprobs, cut)]
    order = list(range(len(pairs)))
    if sort_by_length:   # stable: rows of equal length keep their order
        order.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    batches = [collate_training([pairs[i] for i in rows], pad_id,
                                logprobs=None if scores is None else [scores[i] for i in rows])
               for rows in (order[start:start + micro_size] for start in range(0, len(order), micro_size))]
    length = max(b.input_ids.shape[1] for b in batches)
    return [b.to(device) for b in batches] if device is not None else batches, length


def collate_prompts(prompts: Sequence[Union[TokenizedExample, Sequence[int]]], pad_id: int,
                    padding_side: str = "left") -> PromptBatch:
    """Prompt ids (or examples) -> a padded ``PromptBatch`` for generation; left padding by default."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    rows = [list(p.prompt_ids) if isinstance(p, TokenizedExample) else list(p) for p in prompts]
    if any(not row for row in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return PromptBatch(input_ids, attention_mask, torch.tensor([len(r) for r in rows], dtype=torch.long), padding_side)


def trim_generation(tokens: Sequence[int], eos_id: Union[int, Iterable[int]],
                    pad_id: Optional[int] = None) -> list[int]:
    """A generated response up to and including its first stop token (``eos_id``: one id or several); without one,
    trailing ``pad_id`` tokens are dropped. The one stop trimming of every generator that pads (HF generate)."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    tokens = [int(t) for t in tokens]
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
    if end is not None:
        return tokens[:end]
    if pad_id is not None:
        while tokens and tokens[-1] == pad_id:
            tokens.pop()
    return tokens


def batch_from_generations(prompts: Union[PromptBatch, IdRows], responses: Union[torch.Tensor, IdRows], eos_id: int,
                           pad_id: int, pad_to: Optional[int] = None, pad_to_multiple_of: int = 1) -> TrainingBatch:
    """Prompts plus the student's generated continuations -> a ``TrainingBatch`` with the usual mask convention.

    ``responses`` holds only the new tokens (e.g. ``generate(...)[:, prompt_width:]``); each row is cut after its first
    EOS (the EOS is a target), or keeps all its tokens, minus trailing padding, when it hit the token limit.
    """
    prompt_rows = prompts.prompts() if isinstance(prompts, PromptBatch) else [list(p) for p in prompts]
    response_rows = responses.tolist() if isinstance(responses, torch.Tensor) else [list(r) for r in responses]
    if len(prompt_rows) != len(response_rows):
        raise ValueError(f"{len(prompt_rows)} prompts but {len(response_rows)} generated responses")
    pairs = [(p, trim_generation(r, eos_id, pad_id)) for p, r in zip(prompt_rows, response_rows)]
    return collate_training(pairs, pad_id, pad_to, pad_to_multiple_of)
