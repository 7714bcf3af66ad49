"""Which examples each data-parallel rank trains on, deterministic and resumable.

Every epoch has one global order, a permutation drawn from (seed, epoch) alone, cut into global batches of
``global_batch_size``; the tail that does not fill a whole global batch is left out of that epoch (shuffling puts
other examples there next epoch). Data-parallel rank r takes the r-th contiguous slice of ``global_batch_size / dp_size``
indices of every global batch, so the ranks' slices are disjoint and together cover the global batch.

The state is two counters, ``epoch`` and ``position`` (global batches already consumed in this epoch); saving
``state_dict()`` with a checkpoint and restoring it with ``load_state_dict`` makes a resumed run see exactly the next
batches the interrupted run would have seen. The state counts global batches, so it survives a change of dp_size.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class DistributedBatchSampler:
    def __init__(self, num_examples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                             f"data-parallel size {dp_size}")
        if num_examples < global_batch_size:
            raise ValueError(f"the data set has {num_examples} examples, fewer than one global batch "
                             f"({global_batch_size}); lower batch.global_size or add data")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    def global_order(self, epoch: int) -> np.ndarray:
        """The permutation of all example indices for ``epoch``; a function of (seed, epoch) only."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def global_batch(self, epoch: int, position: int) -> list[int]:
        """All ranks' indices of global batch ``position`` of ``epoch``."""
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.global_order(epoch), epoch
        start = position * self.global_batch_size
        return self._order[start:start + self.global_batch_size].tolist()

    def next_batch(self) -> list[int]:
        """This rank's indices of the next global batch; rolls over into the next epoch when one is used up."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.global_batch(self.epoch, self.position)
        self.position += 1
        share = self.per_rank_batch_size
        return batch[self.dp_rank * share:(self.dp_rank + 1) * share]

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, one rank-local batch at a time (a finished epoch yields the next one)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_examples", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the sampler: checkpoint has {key}={state[key]}, this run has "
                                 f"{getattr(self, key)} (same data and batch size are required)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
