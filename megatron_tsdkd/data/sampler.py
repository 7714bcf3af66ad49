"""Which examples each data-parallel rank trains on, deterministic and resumable.

Every epoch has one global order, a permutation drawn from (seed, epoch) alone, cut into global batches of
``global_batch_size``; the tail that does not fill a whole global batch is left out of that epoch (shuffling puts
other examples there next epoch). Data-parallel rank r takes the r-th contiguous slice of ``global_batch_size / dp_size``
indices of every global batch, so the ranks' slices are disjoint and together cover the global batch.

With ``lengths`` (tokens per example; config ``data.group_by_length``) the global order groups examples of similar
length into the same global batch, so the micro-batches of a step pad little: the epoch's permutation (the same as
without grouping, tail left out) is cut into windows of ``group_batches`` global batches, each window is sorted by
length (longest first, ties in permutation order) and cut into global batches, and the order of all the epoch's global
batches is then shuffled with the same (seed, epoch), so long and short steps alternate. Everything is a function of
(seed, epoch, lengths), so resuming needs nothing more than without grouping; the state records a digest of the
lengths so that a resume against other data (or another tokenisation) stops instead of drawing other batches.

The state is two counters, ``epoch`` and ``position`` (global batches already consumed in this epoch); saving
``state_dict()`` with a checkpoint and restoring it with ``load_state_dict`` makes a resumed run see exactly the next
batches the interrupted run would have seen. The state counts global batches, so it survives a change of dp_size.
"""
from __future__ import annotations

import zlib
from typing import Iterator, Optional, Sequence

import numpy as np

GROUP_BATCHES = 64   # global batches per length-sorted window: wider groups pad less, narrower stay more random


class DistributedBatchSampler:
    def __init__(self, num_examples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, lengths: Optional[Sequence[int]] = None,
                 group_batches: int = GROUP_BATCHES):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                             f"data-parallel size {dp_size}")
        if num_examples < global_batch_size:
            raise ValueError(f"the data set has {num_examples} examples, fewer than one global batch "
                             f"({global_batch_size}); lower batch.global_size or add data")
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples")
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.group_batches = group_batches
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
            order = np.arange(self.num_examples)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        if self.lengths is None:
            return order
        return self._grouped_by_length(order, epoch)

    def _grouped_by_length(self, order: np.ndarray, epoch: int) -> np.ndarray:
        batch = self.global_batch_size
        order = order[:self.batches_per_epoch * batch]            # the tail, as without grouping, sits out
        window = batch * self.group_batches
        groups = [part[np.argsort(-self.lengths[part], kind="stable")]
                  for part in (order[i:i + window] for i in range(0, len(order), window))]
        batches = np.concatenate(groups).reshape(self.batches_per_epoch, batch)
        if self.shuffle:
            batches = batches[np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))]
        return batches.reshape(-1)

    def lengths_digest(self) -> Optional[int]:
        return None if self.lengths is None else zlib.crc32(self.lengths.tobytes())

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
                "num_examples": self.num_examples, "global_batch_size": self.global_batch_size,
                "lengths_digest": self.lengths_digest()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("lengths_digest") != self.lengths_digest() and "lengths_digest" in state:
            raise ValueError("cannot resume the sampler: the checkpoint grouped examples by other lengths (other data, "
                             "tokenizer or data.group_by_length setting); the same tokenised data is required")
        for key in ("seed", "num_examples", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the sampler: checkpoint has {key}={state[key]}, this run has "
                                 f"{getattr(self, key)} (same data and batch size are required)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def training_sampler(dataset, data_config, global_batch_size: int, dp_rank: int, dp_size: int,
                     seed: int) -> DistributedBatchSampler:
    """The training run's sampler over ``dataset``, as the ``data`` config section asks (shuffle, group_by_length)."""
    lengths = dataset.lengths() if data_config.group_by_length else None
    return DistributedBatchSampler(len(dataset), global_batch_size=global_batch_size, dp_rank=dp_rank,
                                   dp_size=dp_size, seed=seed, shuffle=data_config.shuffle, lengths=lengths)
