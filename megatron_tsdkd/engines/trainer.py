"""The one training step, for both engines: sample -> rollout -> micro-batches -> teacher and student forward /
backward with the method's loss -> optimizer step -> step metrics.

One optimizer step, on every rank:
  1. this data-parallel rank's share of the global batch of prompts (the resumable sampler);
  2. with probability lambda (drawn from (seed, step), the same on every rank) the run plan's rollout backend samples
     the responses (generation/rollout_backends.py); otherwise the data set's responses are used (off-policy);
  3. the step's pairs become micro-batches, each padded to its own longest row (data/collate.py);
  4. the engine runs the forward and backward passes over them, asking this module for each micro-batch's loss
     (``micro_batch_loss``: the method's loss with the loss context, and what to log); the rollout guard compares the
     rollout's log-probabilities with the trainer's (engines/rollout_guard.py), before the update;
  5. the engine's optimizer steps; a rollout backend holding a copy of the weights hears that they changed;
  6. on logged steps, one packed collective brings the metrics to rank 0 (engines/metrics.py).

What an engine supplies (engines/megatron/engine.py, engines/deepspeed/engine.py) and nothing else: the models,
``forward_backward``, ``optimizer_step``, checkpoints (``save`` / ``finalize`` / ``load``), the HF export, its
rollout backends, and where losses run (``computes_losses``: the last pipeline stage, or every rank).

Loss normalisation is per token over the optimizer step: each micro-batch's loss (a mean over its response tokens,
as METHOD.md defines each term) is weighted by its token count and the engine divides the gradients by the step's
total response tokens over all data-parallel ranks. Token-decomposable losses (sft, kd, gkd, distillm, TSD-KD's
gated JSD) are thus exact token means over the global batch, whatever the micro-batch size or data-parallel layout.
TSD-KD's entropy set (top rho) and opener are defined per micro-batch, so those two terms are token-weighted means
of micro-batch values and depend on ``batch.micro_size``. Logged ``loss/*`` values follow the same rule, so the
logged total is the weighted sum of the logged terms.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.data import micro_batches, training_sampler
from megatron_tsdkd.data.collate import TrainingBatch, response_weights
from megatron_tsdkd.engines.loop import Rollout, StepResult, TrainingLoop
from megatron_tsdkd.engines.metrics import ShareWatch, log_startup_summary, step_metrics
from megatron_tsdkd.engines.preemption import PreemptionFlag
from megatron_tsdkd.engines.rollout_guard import RolloutGuard
from megatron_tsdkd.losses.rollout_drift import rollout_drift
from megatron_tsdkd.methods import LossContext, build_method
from megatron_tsdkd.planning.inputs import RunInputs
from megatron_tsdkd.planning.run_plan import RunPlan, preflight
from megatron_tsdkd.runtime.seeds import derive_seed

log = logging.getLogger("megatron_tsdkd.train")


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor          # the method's micro-batch loss (a mean over its targets)
    tokens: torch.Tensor        # its targets (a device scalar)
    reported: dict              # device tensors to log: token-weighted values, tokens, diagnostics, rollout drift


class Trainer(TrainingLoop):
    """The step and the loop (engines/loop.py) over an engine's models; ``plan`` is the run plan."""

    def __init__(self, cfg: TrainConfig, inputs: RunInputs, plan: RunPlan, engine, preemption: PreemptionFlag):
        self.cfg, self.inputs, self.plan, self.engine, self.preemption = cfg, inputs, plan, engine, preemption
        self.tokens, self.total_steps = inputs.tokens, plan.total_steps
        self.method = build_method(cfg.method)
        self.sampler = training_sampler(inputs.train, cfg.data, plan.prompts_per_step, engine.dp_rank,
                                        plan.layout.data_parallel, cfg.seed)
        self.rollouts = engine.rollout_backend(plan.rollout_backend, self.method) if plan.rollout_backend else None
        r = cfg.rollout
        self.guard = RolloutGuard(plan.resolved_config(cfg).rollout.engine, r.max_logprob_diff,
                                  r.logprob_diff_patience)
        self.share_watch = ShareWatch(self.method.share_warning())
        self.step, self.stopped_by_signal, self._resumed = 0, False, False

    @property
    def student(self):
        return self.engine.student

    # ----------------------------------------------------------------------------------------------------------
    # one step

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        indices = self.sampler.next_batch()
        train = self.inputs.train.for_epoch(self.sampler.epoch)   # the epoch of this batch (KPOD stages)
        examples = [train[i] for i in indices]
        rollout = self.rollout(examples)
        batches, seq_len = self.batches_of(rollout, examples)
        diagnose = self.cfg.logging.diagnoses(self.step + 1, self.total_steps)
        reported, phases = self.engine.forward_backward(
            batches, seq_len, partial(self.micro_batch_loss, ctx=self.engine.loss_context(diagnose)))
        drift = {}
        if rollout.on_policy:   # before the update: a run on broken rollouts stops without applying this step
            drift = self.guard.observe(self.step + 1, _summed(reported, "drift"))
        t_update = time.perf_counter()
        update = self.engine.optimizer_step(self.step)
        if update.applied and self.rollouts is not None:   # an fp16 overflow skips the update
            self.rollouts.weights_changed()
        t_end = time.perf_counter()
        self.step += 1
        if not self.cfg.logging.logs(self.step, self.total_steps):
            return StepResult(self.step, None)   # metrics cost a host sync and a collective: logged steps only
        phases = {**phases, "rollout": rollout.seconds, "optimizer": t_end - t_update, "step": t_end - t0}
        if self.rollouts is not None and self.rollouts.syncs_weights:   # the part of time/rollout feeding vLLM
            phases["weight_sync"] = rollout.sync_seconds
        metrics = step_metrics(self.method, reported if self.engine.computes_losses() else None, rollout, update, phases,
                               {**drift, **self.engine.step_values()}, diagnose, self.plan.layout.data_parallel)
        self.share_watch.observe(self.step, metrics)
        return StepResult(self.step, metrics)

    def micro_batch_loss(self, batch: TrainingBatch, student_logits, teacher_logits,
                         ctx: LossContext) -> MicroBatchLoss:
        """One micro-batch's method loss, its target count and what to log (device tensors: no host sync here);
        on diagnostic steps also the method's diagnostics (per micro-batch, not token-weighted); on sampled steps the
        rollout guard's sums."""
        result = self.method.loss(student_logits, teacher_logits, batch, ctx)
        tokens = (batch.loss_mask != 0).sum()   # targets, whatever their (float) weights
        values = torch.stack([result.loss.detach().float()] + [result.metrics[k].float() for k in self.method.logs])
        reported = {"weighted": values * tokens, "tokens": tokens}
        if ctx.diagnose and self.method.diagnostics:
            reported["diagnostics"] = torch.stack([result.diagnostics[k].float() for k in self.method.diagnostics])
        if batch.rollout_logprobs is not None:
            reported["drift"] = rollout_drift(student_logits, batch.labels, batch.loss_mask, batch.rollout_logprobs,
                                              ctx.tp_group, ctx.vocab_size, targets=batch.targets)
        return MicroBatchLoss(result.loss, tokens, reported)

    def batches_of(self, rollout: Rollout, examples) -> tuple[list[TrainingBatch], int]:
        """The step's micro-batches on this rank's device, each padded to its own longest row, and the longest
        width (a public seam: benchmarks watch or replace it)."""
        weights = None if rollout.on_policy else response_weights(examples)   # float loss weights off-policy
        return micro_batches(rollout.pairs, self.plan.micro_size, self.tokens.pad_id, self.cfg.data.max_length,
                             self.engine.device, weights=weights, sort_by_length=self.cfg.batch.sort_by_length,
                             logprobs=rollout.logprobs)

    def rollout(self, examples) -> Rollout:
        """The step's (prompt, response) pairs: sampled by the plan's rollout backend with probability lambda,
        else the data's (a public seam: benchmarks replace it with rows of their own)."""
        r = self.cfg.rollout
        if random.Random(derive_seed(self.cfg.seed, self.step)).random() >= self.plan.on_policy_prob:
            return Rollout([(e.prompt_ids, e.response_ids) for e in examples], on_policy=False)
        start = time.perf_counter()
        seed = derive_seed(self.cfg.seed, self.step, salt=1 + self.engine.dp_rank)
        out, sync_seconds = self.rollouts.generate([e.prompt_ids for e in examples], r, seed)
        pairs = [(examples[i // r.num_samples].prompt_ids, resp) for i, resp in enumerate(out.responses)]
        return Rollout(pairs, True, time.perf_counter() - start, sync_seconds, out.logprobs)

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints: the trainer's state, whatever the engine saves beside it

    def _trainer_state(self) -> dict:
        return {"step": self.step, "seed": self.cfg.seed, "sampler": self.sampler.state_dict(),
                # the method's state (TSD-KD's term balance) lives where the loss runs
                "method": self.engine.from_loss_ranks(self.method.state_dict())}

    def save_checkpoint(self) -> str:
        return self.engine.save(self.step, self._trainer_state(), self.plan.resolved_config(self.cfg))

    def finalize_checkpoint(self, blocking: bool) -> None:
        self.engine.finalize(blocking)

    def maybe_resume(self, folder: Optional[str] = None) -> bool:
        """Restore the plan's checkpoint (once; or ``folder``): the engine's models and optimizer, then the
        trainer's state."""
        if folder is None and not self._resumed:
            folder = self.plan.resume_folder
        if folder is None:
            return False
        state = self.engine.load(folder, self._trainer_state())
        self._resumed = True
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.method.load_state_dict(state.get("method", {}))
        if self.rollouts is not None:   # a replica holds the weights from before the load
            self.rollouts.weights_changed()
        if dist.get_rank() == 0:
            log.warning("resumed from %s at step %d", folder, self.step)
        return True

    # ----------------------------------------------------------------------------------------------------------

    def log_summary(self) -> None:
        self.engine.log_summary_lines()
        log_startup_summary(self.cfg, self.inputs, self.plan, start_step=self.step)

    def close(self) -> None:
        """End the rollout backend (a vLLM replica's shutdown also ends the default process group: last)."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None


def _summed(reported: list, key: str) -> Optional[torch.Tensor]:
    """The sum over micro-batches of ``reported[i][key]`` where losses ran, else None."""
    values = [r[key] for r in reported if key in r]
    return torch.stack(values).sum(0) if values else None


def build_trainer(cfg: TrainConfig, inputs: Optional[RunInputs] = None, plan: Optional[RunPlan] = None) -> Trainer:
    """Check the inputs and plan the run (unless given), start the process groups, build the engine's parts."""
    preemption = PreemptionFlag()   # first: a signal during model loading must not be lost
    if inputs is None or plan is None:
        inputs, plan = preflight(cfg)
    # deferred: the DeepSpeed engine imports DeepSpeed (5 s measured on the CPU machine), which a megatron run never
    # needs; the megatron engine's import is cheap once this module's are done, and stays beside it for symmetry
    if cfg.engine == "deepspeed":
        from megatron_tsdkd.engines.deepspeed.engine import DeepSpeedEngine as Engine
    else:
        from megatron_tsdkd.engines.megatron.engine import MegatronEngine as Engine
    return Trainer(cfg, inputs, plan, Engine(cfg, inputs, plan), preemption)
