"""Greedy-decoding accuracy of a megatron model stage on problems with known answers, under TP/PP/DP.

Every rank of a data-parallel replica decodes the same share of the problems (the generation package keeps TP and
PP ranks in lockstep); correct counts are summed over the data-parallel group, so every rank returns the same result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_tsdkd.eval.answers import extract_answer, is_correct


@dataclass
class AccuracyReport:
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)   # this replica's predictions (question, prediction, answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.accuracy:.1%} ({self.correct}/{self.total})"


def evaluate_accuracy(model, tokenizer, examples, *, stop_token_ids: list[int], pad_token_id: int, vocab_size: int,
                      max_new_tokens: int = 128, batch_size: int = 32) -> AccuracyReport:
    """Collective over the world. ``examples`` carry ``prompt_ids`` and ``answer`` (TokenizedExample)."""
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.generation import SamplingConfig, generate

    missing = [e.source for e in examples if e.answer is None]
    if missing:
        raise ValueError(f"evaluation needs an answer for every problem; none at {missing[0]}")
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    share = examples[dp_rank::dp_size]
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    with torch.no_grad():
        for start in range(0, len(share), batch_size):
            batch = share[start:start + batch_size]
            out = generate(model, [e.prompt_ids for e in batch], greedy, eos_token_ids=stop_token_ids,
                           pad_token_id=pad_token_id, vocab_size=vocab_size)
            for example, response in zip(batch, out.responses):
                text = tokenizer.decode(response, skip_special_tokens=True)
                prediction = extract_answer(text)
                ok = prediction is not None and is_correct(prediction, example.answer)
                correct += int(ok)
                samples.append({"source": example.source, "response": text, "prediction": prediction,
                                "answer": example.answer, "correct": ok})
    model.train(was_training)
    counts = torch.tensor([correct, len(share)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    return AccuracyReport(int(counts[0]), int(counts[1]), samples)
