"""The rollout guard: on every on-policy step, compare the log-probabilities the rollout engine gave the tokens it
sampled with the trainer's own for the same tokens, log how far apart they are, and stop a run whose rollouts come
from other weights than the ones it trains.

Why: a rollout engine that holds stale or wrongly loaded weights (a tied output layer vLLM never re-processed, a
skipped weight sync) samples garbage without any error, and the run trains on it. The trainer's forward already
computes the student's logits for those tokens, so the check costs one label log-probability per token
(losses/rollout_drift.py) and one all-reduce of three numbers per on-policy step, whose read-back is the step's
only extra host sync.

Logged: ``rollout/logprob_diff`` (mean |log p_train - log p_rollout| per response token, nats) and ``rollout/kl``
(the k3 estimate of KL(rollout || train)). Measured on tiny models (README): ~1e-7 for our decode in fp32, ~1e-6 for
a correct vLLM replica, several nats for a replica with other weights. The run stops, with one line naming
``rollout.engine``, when the difference exceeds ``rollout.max_logprob_diff`` on ``rollout.logprob_diff_patience``
on-policy steps in a row (0: never stop, only log). Peers log such a figure (NeMo-RL, verl); none stops the run.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_tsdkd.generation.vllm_rollouts import RolloutEngineError
from megatron_tsdkd.runtime.collectives import all_reduce_values

DIFF, KL = "rollout/logprob_diff", "rollout/kl"


class RolloutDriftError(RolloutEngineError):
    """The rollouts' log-probabilities stayed too far from the trainer's; one line naming rollout.engine."""


class RolloutGuard:
    def __init__(self, engine: str, max_diff: float, patience: int):
        self.engine, self.max_diff, self.patience = engine, max_diff, patience
        self.strikes = 0     # on-policy steps in a row above max_diff

    def observe(self, step: int, local: Optional[torch.Tensor]) -> dict[str, float]:
        """Collective over the world, on on-policy steps only (every rank knows which they are): ``local`` is this
        rank's [sum |d|, sum k3, targets] (losses/rollout_drift.py) summed over its micro-batches, or None where no
        loss ran (pipeline stages before the last). Returns the step's two metrics (the same on every rank) and
        raises RolloutDriftError when the patience is spent. Tensor-parallel ranks hold equal sums, which the
        ratio cancels."""
        sums = all_reduce_values(local if local is not None else [0.0, 0.0, 0.0]).tolist()
        targets = max(sums[2], 1.0)
        metrics = {DIFF: sums[0] / targets, KL: sums[1] / targets}
        self.strikes = self.strikes + 1 if metrics[DIFF] > self.max_diff else 0
        if self.patience and self.strikes >= self.patience:
            raise RolloutDriftError(
                f"rollout.engine={self.engine}: the rollouts' log-probabilities of the tokens they sampled differ "
                f"from the trainer's by {metrics[DIFF]:.3g} nats per token ({DIFF}, KL estimate "
                f"{metrics[KL]:.3g}), above rollout.max_logprob_diff={self.max_diff:g} for {self.strikes} on-policy "
                f"steps in a row (up to step {step}): the engine samples from other weights than the ones trained; "
                f"stopped before training on more of them. The last checkpoint is intact"
                + ("; set rollout.engine=megatron to sample with our own decode" if self.engine != "megatron" else
                   "; our decode disagrees with the training forward: please report it"))
        return metrics
