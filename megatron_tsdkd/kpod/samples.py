"""An epoch's KPOD samples (METHOD.md KPOD 2, 5): the full teacher response, with float loss weights

    a_j = 0      for tokens of the first c_i(t) rationale steps (given as input, no loss)
    a_j = w_j    for later rationale tokens (1 with use_token_weights=false)
    a_j = 1      for answer tokens (the last step and the end-of-turn token)

so L_o(t) = - sum a_j log P(r_j | r_<j, x) is the weighted NLL. Stage t = the training epoch (the trainer's
sampler epoch, restored on resume), clamped to the prepared schedule's last stage (c_i = 0 there).
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_tsdkd.data.chat_dataset import ChatDataset, WeightedExample
from megatron_tsdkd.kpod import artefacts
from megatron_tsdkd.kpod.steps import ANSWER


def sample_weights(token_steps: Sequence[int], weights: Sequence[float], given: int,
                   use_token_weights: bool = True) -> list[float]:
    return [1.0 if s == ANSWER else 0.0 if s < given else (float(w) if use_token_weights else 1.0)
            for s, w in zip(token_steps, weights)]


class KpodDataset(ChatDataset):
    """The training data set with each epoch's weights; examples match ``base`` (the loaded data.train) by line."""

    def __init__(self, base: ChatDataset, steps: list[dict], weights: list[dict], schedule: dict,
                 use_token_weights: bool = True):
        super().__init__(base.examples, base.stats, base.mode)
        by_line = {row["line"]: (q, row, w["weights"]) for q, (row, w) in enumerate(zip(steps, weights))}
        self.rows = []   # per example: (token steps, weights, its question index in the schedule)
        for example in base.examples:
            line = int(example.source.rsplit(":", 1)[1])
            if line not in by_line:
                raise ValueError(f"{example.source} is not in the prepared artefacts (prepared from another file?)")
            q, row, w = by_line[line]
            if list(row["response_ids"][:len(example.response_ids)]) != list(example.response_ids) or \
                    list(row["prompt_ids"]) != list(example.prompt_ids):
                raise ValueError(f"{example.source}: its tokens differ from the prepared ones (other tokenizer?)")
            self.rows.append((row["token_steps"][:len(example.response_ids)], w[:len(example.response_ids)], q))
        self.given = schedule["given"]
        self.use_token_weights = use_token_weights
        self._epoch, self._cache = None, None

    def stage(self, epoch: int) -> int:
        return min(epoch, len(self.given) - 1)

    def for_epoch(self, epoch: int) -> ChatDataset:
        if epoch != self._epoch:
            given = self.given[self.stage(epoch)]
            examples = [WeightedExample(e.prompt_ids, e.response_ids, e.answer, e.source,
                                        sample_weights(s, w, given[q], self.use_token_weights))
                        for e, (s, w, q) in zip(self.examples, self.rows)]
            self._epoch, self._cache = epoch, ChatDataset(examples, self.stats, self.mode)
        return self._cache


def load_kpod_dataset(base: ChatDataset, prepared_dir: str, use_token_weights: bool = True) -> KpodDataset:
    path = lambda name: os.path.join(prepared_dir, name)  # noqa: E731
    missing = [name for name in artefacts.ALL if not os.path.isfile(path(name))]
    if missing:
        raise ValueError(f"{prepared_dir} lacks {', '.join(missing)}; run tsdkd-kpod-prepare first")
    return KpodDataset(base, artefacts.read_jsonl(path(artefacts.STEPS)), artefacts.read_jsonl(path(artefacts.WEIGHTS)),
                       artefacts.read_json(path(artefacts.SCHEDULE)), use_token_weights)


def check_schedule_settings(method_config) -> None:
    """The prepared schedule was built with the method config's switches, else a ValueError naming the key."""
    if not method_config.prepared_dir:
        raise ValueError("is not set; name the folder tsdkd-kpod-prepare wrote")
    recorded = artefacts.read_json(os.path.join(method_config.prepared_dir, artefacts.SCHEDULE))["settings"]
    for key, value in method_config.schedule_settings().items():
        if recorded.get(key) != value:
            raise ValueError(f"schedule.json was prepared with {key}={recorded.get(key)!r} but the config gives "
                             f"{value!r} (method.{key}); rerun tsdkd-kpod-prepare with the same switches")
