"""The outer training loop (engines/trainer.py runs it for both engines): resume, the start-up summary, the steps and
their metrics, periodic saves, the save a preemption signal asks for, the final save. One place for the rules a user relies on: a requeued job resumes where it stopped, a signal costs at most the
step in flight, a finished job that is requeued saves nothing new, and no checkpoint write is left unfinished when
the loop returns (an asynchronous write is finalised after the step it ends in, before the next save, after the save
a signal asks for, and at the end: engines/checkpoint.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_tsdkd.engines.metrics import MetricsLogger

log = logging.getLogger("megatron_tsdkd.train")


@dataclass
class StepResult:
    step: int
    metrics: Optional[dict[str, float]]   # on global rank 0 only, on logged steps


@dataclass
class Update:
    """What an engine's optimizer step did."""
    applied: bool                                 # False: fp16 found an overflow and skipped the update
    grad_norm: Optional[float]                    # before clipping (None when not measured)
    lr: float                                     # the learning rate this step applied
    loss_scale: object = 1.0                      # fp16's dynamic loss scale (a number or a device scalar), else 1


@dataclass
class Rollout:
    """A step's training pairs, as the rollout gives them."""
    pairs: list                                   # (prompt ids, response ids)
    on_policy: bool                               # sampled by the student (else the data set's responses)
    seconds: float = 0.0                          # the sampling, the weight sync included
    sync_seconds: float = 0.0                     # of which: feeding a vLLM replica the new weights
    logprobs: Optional[list[list[float]]] = None  # the engine's per-token log-probabilities (GenerationOutput)


class TrainingLoop:
    """Mixin. The trainer provides ``cfg``, ``total_steps``, ``step``, ``preemption`` (a PreemptionFlag),
    ``stopped_by_signal``, ``maybe_resume()``, ``log_summary()``, ``train_step() -> StepResult``,
    ``save_checkpoint() -> str`` and ``finalize_checkpoint(blocking)`` (publish a write that has ended; wait for
    it when ``blocking``)."""

    def train(self, stop_after: Optional[int] = None, summary: bool = True) -> list[StepResult]:
        """Run to the last step. ``stop_after`` ends the loop after that step WITHOUT saving, as if the job were
        killed right after it, with the saves begun before then finished (tests use it to prove resume exactness).
        ``summary``: log the start-up summary on rank 0 (the job logs it itself when it evaluates first)."""
        self.maybe_resume()
        resumed_at, flag, interval = self.step, self.preemption, self.cfg.checkpoint.interval
        if summary:
            self.log_summary()
        logger = MetricsLogger(self.cfg.logging.dir, self.total_steps, self.step, self.cfg.logging.progress_bar,
                               name=self.cfg.method.name)
        history = []
        try:
            while self.step < self.total_steps:
                result = self.train_step()
                history.append(result)
                if result.metrics is not None:
                    logger.log(self.step, result.metrics)
                if stop_after is not None and self.step >= stop_after:
                    break
                self.finalize_checkpoint(blocking=False)   # a write that ended moves ``latest`` now
                periodic = bool(interval) and self.step % interval == 0 and self.step < self.total_steps
                path = self.save_checkpoint() if periodic else None
                if flag.any_rank_received():   # also one that came during that save: it is the save it asks for
                    self.stopped_by_signal = True
                    path = path or self.save_checkpoint()
                    self.finalize_checkpoint(blocking=True)
                    if dist.get_rank() == 0:
                        log.warning("signal received (%s on this rank): saved %s at step %d; stopping",
                                    flag.name, path, self.step)
                    break
            else:
                if self.step > resumed_at:  # a job requeued after its last step has nothing new to save
                    self.save_checkpoint()
            self.finalize_checkpoint(blocking=True)   # (stop_after: the kill comes after the saves made so far)
        finally:
            logger.close()
            flag.restore()
        return history
