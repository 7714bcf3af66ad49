"""The training loop: rollout -> co-located teacher/student forward -> method loss -> backward -> optimizer step.

One optimizer step, on every rank:
  1. take this data-parallel rank's share of the global batch of prompts (resumable sampler);
  2. with probability lambda (drawn from (seed, step), identical on all ranks) the student samples the responses
     with its KV cache under TP/PP; otherwise the data set's responses are used (off-policy);
  3. megatron-core's pipeline schedule runs the co-located stage over the micro-batches (each padded to its own
     longest row: variable sequence lengths, training/colocation.py); the last stage computes the method loss on
     both models' vocab-sharded logits;
  4. megatron-core's (distributed) optimizer steps; the scheduler advances; metrics go to rank 0.

Loss normalisation is per token over the optimizer step: each micro-batch's loss (a mean over its response tokens,
as METHOD.md defines each term) is weighted by its token count, the schedule sums, and megatron-core's
``finalize_model_grads`` divides the gradients by the step's total response tokens over all data-parallel ranks
(``calculate_per_token_loss``). Token-decomposable losses (sft, kd, gkd, distillm, TSD-KD's gated JSD) are thus
exact token means over the global batch, whatever the micro-batch size or data-parallel layout. TSD-KD's entropy
set (top rho) and opener are defined per micro-batch, so those two terms are token-weighted means of micro-batch
values and depend on ``batch.micro_size``. Logged ``loss/*`` values follow the same rule, so the logged total is the
weighted sum of the logged terms.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.data import TrainingBatch, micro_batches
from megatron_tsdkd.data.collate import response_weights
from megatron_tsdkd.generation import generate
from megatron_tsdkd.generation.co_generation import co_generate
from megatron_tsdkd.models import MODEL_KEY
from megatron_tsdkd.runtime import device
from megatron_tsdkd.runtime.collectives import broadcast_object
from megatron_tsdkd.runtime.seeds import derive_seed
from megatron_tsdkd.training import checkpoint
from megatron_tsdkd.training.build import TrainingParts, build_parts, sync_student_params
from megatron_tsdkd.losses.rollout_drift import rollout_drift
from megatron_tsdkd.training.loop import Rollout, StepResult, TrainingLoop
from megatron_tsdkd.training.metrics import ShareWatch, reduce_to_rank0
from megatron_tsdkd.training.optim import adam_step, materialise_optimizer_state, set_adam_step
from megatron_tsdkd.training.rollout_guard import RolloutGuard
from megatron_tsdkd.training.run_config import CONFIG_FILE, config_yaml

log = logging.getLogger("megatron_tsdkd.train")

# Megatron-LM's default: each rank saves its own optimizer shard (no gather); reshardable over DP only.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


class Trainer(TrainingLoop):
    def __init__(self, cfg: TrainConfig, parts: TrainingParts):
        self.cfg, self.parts = cfg, parts
        self.student, self.stage, self.method = parts.student, parts.stage, parts.method
        self.optimizer, self.scheduler, self.sampler = parts.optimizer, parts.scheduler, parts.sampler
        self.tokens = parts.inputs.tokens
        self.total_steps = parts.total_steps
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.step = 0
        self.stopped_by_signal = False
        self.preemption = parts.preemption
        self.forward_backward = get_forward_backward_func()
        self.loss_names = ("total",) + self.method.logs
        self.share_watch = ShareWatch(self.method.share_warning())
        self.rollouts = parts.rollouts   # vLLM replicas (rollout.engine=vllm), else None: our decode
        r = cfg.rollout
        self.guard = RolloutGuard(r.engine, r.max_logprob_diff, r.logprob_diff_patience)

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def _sharded_state(self, is_loading: bool) -> dict:
        if is_loading:
            materialise_optimizer_state(self.optimizer)
        model_sd = unwrap_model(self.student).sharded_state_dict()  # the same keys as models.save_mcore_weights
        return {
            MODEL_KEY: model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_FORMAT),
            "trainer": {"step": self.step, "adam_step": adam_step(self.optimizer), "seed": self.cfg.seed,
                        "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                        # the method's state (TSD-KD's term balance) lives where the loss runs, the last stage
                        "method": self.method.state_dict() if is_loading else broadcast_object(
                            self.method.state_dict(), ps.get_pipeline_model_parallel_last_rank(),
                            ps.get_pipeline_model_parallel_group())},
        }

    @functools.cached_property
    def checkpoints(self) -> checkpoint.CheckpointWriter:
        c = self.cfg.checkpoint
        return checkpoint.CheckpointWriter(c.dir, c.keep_last, c.async_save,
                                           ps.get_data_parallel_group(with_context_parallel=True))

    def save_checkpoint(self) -> str:
        sync_student_params(self.student)   # overlap_param_gather: the last step's weights (training/build.py)
        return self.checkpoints.save(self.step, self._sharded_state(is_loading=False),
                                     self.parts.inputs.student.meta_dir, {CONFIG_FILE: config_yaml(self.cfg)})

    def finalize_checkpoint(self, blocking: bool) -> None:
        self.checkpoints.finalize(blocking)

    def maybe_resume(self) -> bool:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return False
        folder = checkpoint.latest_checkpoint(self.cfg.checkpoint.dir) if resume == "auto" else resume
        if folder is None:
            return False
        state = self.checkpoints.load(folder, self._sharded_state(is_loading=True))
        with torch.no_grad():  # the optimizer copies into (views of) the parameters in place
            unwrap_model(self.student).load_state_dict(state[MODEL_KEY], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        trainer_state = state["trainer"]
        set_adam_step(self.optimizer, trainer_state["adam_step"])
        self.step = int(trainer_state["step"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["sampler"])
        self.method.load_state_dict(trainer_state.get("method", {}))
        if self.rollouts is not None:
            self.rollouts.weights_changed()
        if dist.get_rank() == 0:
            log.warning("resumed from %s at step %d", folder, self.step)
        return True

    # ----------------------------------------------------------------------------------------------------------
    # one step

    def _rollout(self, examples) -> Rollout:
        """The step's (prompt, response) pairs: sampled by the student (or, for a co-generation method, by student
        and teacher together) with probability lambda, else the data's."""
        r = self.cfg.rollout
        if random.Random(derive_seed(self.cfg.seed, self.step)).random() >= r.on_policy_prob:
            return Rollout([(e.prompt_ids, e.response_ids) for e in examples], on_policy=False)
        start, sync_seconds = time.perf_counter(), 0.0
        prompts = [e.prompt_ids for e in examples]
        common = dict(eos_token_ids=self.tokens.stop_ids, pad_token_id=self.tokens.pad_id,
                      vocab_size=self.tokens.vocab_size,
                      generator_seed=derive_seed(self.cfg.seed, self.step, salt=1 + self.dp_rank))
        if self.method.co_generation:   # both models pick each token (SKD, MiniLLM): the co-located teacher joins
            out = co_generate(unwrap_model(self.student), unwrap_model(self.stage.teacher), prompts, r,
                              self.method.co_sampling(), **common)
        elif self.rollouts is not None:   # the colocated vLLM replicas, synced first if the weights moved
            out, sync_seconds = self.rollouts.generate(prompts, r, eos_token_ids=self.tokens.stop_ids,
                                                       generator_seed=common["generator_seed"])
        else:
            out = generate(unwrap_model(self.student), prompts, r, **common)
        pairs = [(examples[i // r.num_samples].prompt_ids, resp) for i, resp in enumerate(out.responses)]
        return Rollout(pairs, True, time.perf_counter() - start, sync_seconds, out.logprobs)

    def _logged(self, step: int) -> bool:
        """Whether ``step`` (1-based) logs metrics: every ``logging.interval`` steps, each diagnostic step, the last."""
        return self.cfg.logging.logs(step, self.total_steps)

    def _diagnosed(self, step: int) -> bool:
        """Whether ``step`` (1-based) computes the method's diagnostics: every ``logging.diagnostics_interval``
        steps, and the last one."""
        return self.cfg.logging.diagnoses(step, self.total_steps)

    def _loss(self, batch: TrainingBatch, output):
        """Loss weighted by the micro-batch's response tokens (see the module docstring), the token count for the
        schedule, and the weighted values to log (one device tensor: no host sync here); on diagnostic steps also
        the method's diagnostics (plain per-micro-batch values, not token-weighted)."""
        student_logits, teacher_logits = output
        self.method.logging_step = self._diagnosed(self.step + 1)   # the step this schedule runs
        result = self.method.loss(student_logits, teacher_logits, batch, tp_group=self.tp_group,
                                  vocab_size=self.tokens.vocab_size)
        tokens = (batch.loss_mask != 0).sum()   # targets, whatever their (float) weights
        values = torch.stack([result.loss.detach()] + [result.metrics[k].float() for k in self.method.logs])
        reported = {"weighted": values * tokens, "tokens": tokens}
        if self.method.logging_step and self.method.diagnostics:
            reported["diagnostics"] = torch.stack([result.diagnostics[k].float() for k in self.method.diagnostics])
        if batch.rollout_logprobs is not None:   # the rollout guard's sums (training/rollout_guard.py)
            reported["drift"] = rollout_drift(student_logits, batch.labels, batch.loss_mask, batch.rollout_logprobs,
                                              self.tp_group, self.tokens.vocab_size, targets=batch.targets)
        return result.loss * tokens, tokens.to(torch.int), reported

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return model(batch.input_ids, batch.position_ids, None), partial(self._loss, batch)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        indices = self.sampler.next_batch()
        train = self.parts.inputs.train.for_epoch(self.sampler.epoch)   # the epoch of this batch (KPOD stages)
        examples = [train[i] for i in indices]
        rollout = self._rollout(examples)
        pairs, on_policy = rollout.pairs, rollout.on_policy
        weights = None if on_policy else response_weights(examples)   # float loss weights of off-policy data
        # each micro-batch padded to its own longest row; at PP > 1 the p2p is told each one's shape, which every
        # stage knows (training/colocation.py): seq_len (the longest) is what megatron's signature asks for
        batches, seq_len = micro_batches(pairs, self.cfg.batch.micro_size, self.tokens.pad_id,
                                         self.cfg.data.max_length, device(), weights=weights,
                                         sort_by_length=self.cfg.batch.sort_by_length, logprobs=rollout.logprobs)
        self.stage.clock.pop()
        self.optimizer.zero_grad()
        self.student.zero_grad_buffer()
        with self.stage.clock.phase("schedule"):   # device time on GPU (events), wall time on CPU
            reported = self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.stage],
                num_microbatches=self.parts.num_microbatches, seq_length=seq_len,
                micro_batch_size=self.cfg.batch.micro_size, forward_only=False,
                **self.stage.schedule_arguments(batches))
        drift = {}
        if on_policy:   # before the update: a run on broken rollouts stops without applying this step
            local = (torch.stack([r["drift"] for r in reported]).sum(0)
                     if reported and "drift" in reported[0] else None)
            drift = self.guard.observe(self.step + 1, local)
        t2 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]           # the rate this step applies
        success, grad_norm, _ = self.optimizer.step()
        if success:   # an fp16 overflow skips the update; the schedule waits for it (as Megatron-LM's does)
            self.scheduler.step(increment=1)
            if self.rollouts is not None:
                self.rollouts.weights_changed()
        t3 = time.perf_counter()
        self.step += 1
        phases = self.stage.clock.pop()
        if not self._logged(self.step):
            return StepResult(self.step, None)  # metrics cost a host sync and a collective: logged steps only
        # Every rank knows the metric names (config, method, step); the last stage's values are the ones logged.
        forward = phases.get("teacher_forward", 0.0) + phases.get("student_forward", 0.0)
        step_values = {   # known on every rank
            "time/rollout": rollout.seconds, "time/teacher_forward": phases.get("teacher_forward", 0.0),
            "time/student_forward": phases.get("student_forward", 0.0),
            "time/student_backward": max(phases["schedule"] - forward, 0.0), "time/optimizer": t3 - t2,
            "time/step": t3 - t0, "rollout/on_policy": float(on_policy),
            "rollout/response_length": sum(len(r) for _, r in pairs) / len(pairs),
            "optim/lr": lr, "optim/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "optim/update_skipped": 0.0 if success else 1.0,
            "optim/loss_scale": self.optimizer.get_loss_scale(),   # fp16's dynamic scale, 1 otherwise (on device)
            "throughput/tokens_per_s": sum(len(p) + len(r) for p, r in pairs) / max(t3 - t0, 1e-9),
        }
        step_values.update(drift)   # the rollout guard's figures (on-policy steps)
        if self.rollouts is not None:   # the part of time/rollout that fed the vLLM replicas the new weights
            step_values["time/weight_sync"] = rollout.sync_seconds
        sums = [f"loss/{k}" for k in self.loss_names] + ["tokens/response"]
        diagnostics = list(self.method.diagnostics) if self._diagnosed(self.step) else []
        local = None
        if ps.is_pipeline_last_stage():   # device scalars, read back on rank 0 only, after the collectives
            weighted = torch.stack([r["weighted"] for r in reported]).sum(0)
            tokens = torch.stack([r["tokens"] for r in reported]).sum()
            local = dict(zip(sums, [*weighted.unbind(), tokens]))
            if diagnostics:   # means over micro-batches, then (reduce_to_rank0) over DP ranks
                local.update(zip(diagnostics, torch.stack([r["diagnostics"] for r in reported]).mean(0).unbind()))
            local.update(step_values)
        metrics = reduce_to_rank0(local, sums + diagnostics + list(step_values))   # one packed tensor, DP means
        if metrics is not None:            # weighted sums / tokens: the per-token means of the whole step
            for name in self.loss_names:
                metrics[f"loss/{name}"] /= max(metrics["tokens/response"], 1.0)
            metrics["tokens/response"] *= ps.get_data_parallel_world_size()   # the step's total
            self.share_watch.observe(self.step, metrics)
        return StepResult(self.step, metrics)


    def close(self) -> None:
        """End the vLLM replicas, if any. Last thing in the job: vLLM's shutdown also ends the default process
        group (generation/vllm_replica.py)."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None


def build_trainer(cfg: TrainConfig, inputs=None) -> Trainer:
    """Check the inputs (unless given), start the process groups and build every part; see training/build.py."""
    return Trainer(cfg, build_parts(cfg, inputs))
