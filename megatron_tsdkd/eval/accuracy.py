"""Greedy-decoding accuracy of a megatron model stage on problems with known answers, under TP/PP/DP.

Every rank of a data-parallel replica decodes the same share of the problems (the generation package keeps TP and
PP ranks in lockstep); correct counts are summed over the data-parallel group, so every rank returns the same result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_tsdkd.eval.answers import extract_answer, is_correct
from megatron_tsdkd.generation import SamplingConfig, generate
from megatron_tsdkd.runtime.collectives import sum_counts


@dataclass
class AccuracyReport:
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)   # this replica's predictions (question, prediction, answer)
    matched: int = -1                                   # responses in which the extractor found an answer

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.accuracy:.1%} ({self.correct}/{self.total})"


def evaluate_accuracy(model, tokenizer, examples, *, tokens, max_new_tokens: int = 128,
                      batch_size: int = 32, extractor=None) -> AccuracyReport:
    """Collective over the world. ``examples`` carry ``prompt_ids`` and ``answer`` (TokenizedExample); ``tokens``
    is the run's TokenSpec (stop ids, pad id, real vocabulary); ``extractor`` (answers.make_extractor) reads the
    final answer of a response (default: extract_answer). ``report.matched`` counts responses it found one in."""
    from megatron.core import parallel_state as ps

    missing = [e.source for e in examples if e.answer is None]
    if missing:
        raise ValueError(f"evaluation needs an answer for every problem; none at {missing[0]}")
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    share = examples[dp_rank::dp_size]
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    was_training = model.training
    model.eval()
    correct, matched, samples = 0, 0, []
    with torch.no_grad():
        for start in range(0, len(share), batch_size):
            batch = share[start:start + batch_size]
            out = generate(model, [e.prompt_ids for e in batch], greedy, eos_token_ids=tokens.stop_ids,
                           pad_token_id=tokens.pad_id, vocab_size=tokens.vocab_size)
            for example, response in zip(batch, out.responses):
                text = tokenizer.decode(response, skip_special_tokens=True)
                prediction = (extractor or extract_answer)(text)
                ok = prediction is not None and is_correct(prediction, example.answer)
                correct += int(ok)
                matched += int(prediction is not None)
                samples.append({"source": example.source, "response": text, "prediction": prediction,
                                "answer": example.answer, "correct": ok})
    model.train(was_training)
    group = ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None  # None: a world of one
    correct, total, matched = sum_counts([correct, len(share), matched], group=group)
    return AccuracyReport(correct, total, samples, matched)
