"""The training loop: rollout -> co-located teacher/student forward -> method loss -> backward -> optimizer step.

One optimizer step, on every rank:
  1. take this data-parallel rank's share of the global batch of prompts (resumable sampler);
  2. with probability lambda (drawn from (seed, step), identical on all ranks) the student samples the responses
     with its KV cache under TP/PP; otherwise the data set's responses are used (off-policy);
  3. megatron-core's pipeline schedule runs the co-located stage over the micro-batches; the last stage computes
     the method loss on both models' vocab-sharded logits;
  4. megatron-core's (distributed) optimizer steps; the scheduler advances; metrics go to rank 0.
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
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.methods import build_method
from megatron_tsdkd.models import MODEL_KEY
from megatron_tsdkd.runtime import ParallelLayout, device, init_distributed
from megatron_tsdkd.training import checkpoint
from megatron_tsdkd.training.colocation import CoLocatedStage, unwrap
from megatron_tsdkd.training.memory_plan import check_memory_plan
from megatron_tsdkd.training.metrics import MetricsLogger, reduce_to_rank0
from megatron_tsdkd.training.optim import (adam_step, build_optimizer, build_scheduler, materialise_optimizer_state,
                                           set_adam_step)
from megatron_tsdkd.training.preemption import PreemptionFlag
from megatron_tsdkd.training.setup import TrainingSetup, prepare

log = logging.getLogger("megatron_tsdkd.train")

# Megatron-LM's default: each rank saves its own optimizer shard (no gather); reshardable over DP only.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class StepResult:
    step: int
    metrics: Optional[dict[str, float]]   # on global rank 0 only


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """Every random draw of a step derives from (seed, step): restoring the step restores the randomness."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def _finalize_student_grads(student, _model_chunks, *args, **kwargs):
    finalize_model_grads([student], *args, **kwargs)


class Trainer:
    def __init__(self, cfg: TrainConfig, setup: Optional[TrainingSetup] = None):
        self.cfg = cfg
        self.preemption = PreemptionFlag()           # early: a signal during model loading must not be lost
        self.setup = setup or prepare(cfg)           # validates models/tokenizer/data before any process group
        init_distributed(ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline), seed=cfg.seed)
        self.memory_plan = check_memory_plan(  # refuses a layout that cannot fit, before anything is allocated
            cfg, dist.get_world_size(), self.setup.student.hf_config,
            self.setup.teacher.hf_config if self.setup.teacher is not None else None,
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
        self.dtype = DTYPES[cfg.precision.dtype]
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.method = build_method(cfg.method)

        s = self.setup
        student = s.build_student(self.dtype)
        teacher = s.build_teacher(self.dtype) if self.method.needs_teacher else None
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer)
        self.student = DistributedDataParallel(config=student.config, ddp_config=ddp_config, module=student)
        self.teacher = teacher
        self.stage = CoLocatedStage(self.student, teacher)
        self.stage.config.no_sync_func = self.student.no_sync
        # the schedule hands its model list (the co-located stage); grads live in the student's DDP buffers
        self.stage.config.finalize_model_grads_func = partial(_finalize_student_grads, self.student)

        b = cfg.batch
        if b.global_size % (self.dp_size * b.micro_size):
            raise ValueError(f"batch.global_size ({b.global_size}) must be a multiple of data-parallel size "
                             f"({self.dp_size}) x batch.micro_size ({b.micro_size})")
        self.num_microbatches = b.global_size // (self.dp_size * b.micro_size)
        self.prompts_per_rank = b.global_size // self.dp_size
        if self.prompts_per_rank % cfg.rollout.num_samples:
            raise ValueError(f"rollout.num_samples ({cfg.rollout.num_samples}) must divide the per-rank batch "
                             f"({self.prompts_per_rank} sequences)")

        self.sampler = s.make_sampler(prompts_per_step=b.global_size // cfg.rollout.num_samples,
                                      dp_rank=self.dp_rank, dp_size=self.dp_size)
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.sampler.batches_per_epoch
        self.optimizer = build_optimizer(cfg, [self.student], self.dtype)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.step = 0
        self.stopped_by_signal = False
        self.forward_backward = get_forward_backward_func()

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def _sharded_state(self, is_loading: bool) -> dict:
        if is_loading:
            materialise_optimizer_state(self.optimizer)
        model_sd = unwrap(self.student).sharded_state_dict()  # the same keys as models.save_mcore_weights
        return {
            MODEL_KEY: model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_FORMAT),
            "trainer": {"step": self.step, "adam_step": adam_step(self.optimizer),
                        "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "seed": self.cfg.seed},
        }

    def save_checkpoint(self) -> str:
        c = self.cfg.checkpoint
        return checkpoint.save(c.dir, self.step, self._sharded_state(is_loading=False), self.setup.student_hf_meta,
                               c.keep_last)

    def maybe_resume(self) -> bool:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return False
        folder = checkpoint.latest_checkpoint(self.cfg.checkpoint.dir) if resume == "auto" else resume
        if folder is None:
            return False
        state = checkpoint.load(folder, self._sharded_state(is_loading=True))
        with torch.no_grad():  # the optimizer copies into (views of) the parameters in place
            unwrap(self.student).load_state_dict(state[MODEL_KEY], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        trainer_state = state["trainer"]
        set_adam_step(self.optimizer, trainer_state["adam_step"])
        self.step = int(trainer_state["step"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["sampler"])
        if dist.get_rank() == 0:
            log.warning("resumed from %s at step %d", folder, self.step)
        return True

    # ----------------------------------------------------------------------------------------------------------
    # one step

    def _rollout(self, examples) -> tuple[list, bool, dict]:
        """The step's (prompt, response) pairs: sampled by the student with probability lambda, else the data's."""
        r = self.cfg.rollout
        on_policy = random.Random(step_seed(self.cfg.seed, self.step)).random() < r.on_policy_prob
        if not on_policy:
            return [(e.prompt_ids, e.response_ids) for e in examples], False, {}
        start = time.perf_counter()
        student = unwrap(self.student)
        student.eval()
        with torch.no_grad():
            out = self.setup.generate(student, [e.prompt_ids for e in examples], r,
                                      seed=step_seed(self.cfg.seed, self.step, salt=1 + self.dp_rank))
        student.train()
        pairs = [(examples[i // r.num_samples].prompt_ids, resp) for i, resp in enumerate(out)]
        lengths = [len(resp) for _, resp in pairs]
        return pairs, True, {"rollout_seconds": time.perf_counter() - start,
                             "response_length": sum(lengths) / max(len(lengths), 1)}

    def _loss(self, batch: dict, output):
        student_logits, teacher_logits = output
        result = self.method.loss(student_logits, teacher_logits, batch, tp_group=self.tp_group,
                                  vocab_size=self.setup.vocab_size)
        reported = {"loss/total": result.loss.detach().float(), "tokens": batch["loss_mask"].sum().float()}
        reported.update({f"loss/{k}": torch.as_tensor(v).float() for k, v in result.metrics.items()})
        return result.loss, reported

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["input_ids"], batch["position_ids"], None)
        return output, partial(self._loss, batch)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        examples = [self.setup.examples[i] for i in self.sampler.next_batch()]
        pairs, on_policy, rollout_stats = self._rollout(examples)
        micro_batches, seq_len = self.setup.collate(pairs, self.cfg.batch.micro_size, device())
        t1 = time.perf_counter()
        self.stage.clock.pop()
        self.optimizer.zero_grad()
        self.student.zero_grad_buffer()
        reported = self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=iter(micro_batches), model=[self.stage],
            num_microbatches=self.num_microbatches, seq_length=seq_len, micro_batch_size=self.cfg.batch.micro_size,
            forward_only=False)
        t2 = time.perf_counter()
        success, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        t3 = time.perf_counter()
        self.step += 1

        local = None
        if ps.is_pipeline_last_stage():
            keys = reported[0].keys()
            local = {k: sum(float(r[k]) for r in reported) / len(reported) for k in keys if k != "tokens"}
            local["tokens/response"] = sum(float(r["tokens"]) for r in reported)
        phases = self.stage.clock.pop()
        if local is not None:
            fwd = phases.get("teacher_forward", 0.0) + phases.get("student_forward", 0.0)
            local.update({
                "time/rollout": rollout_stats.get("rollout_seconds", 0.0),
                "time/teacher_forward": phases.get("teacher_forward", 0.0),
                "time/student_forward": phases.get("student_forward", 0.0),
                "time/student_backward": max(t2 - t1 - fwd, 0.0),
                "time/optimizer": t3 - t2,
                "time/step": t3 - t0,
                "rollout/on_policy": float(on_policy),
                "rollout/response_length": rollout_stats.get(
                    "response_length", sum(len(r) for _, r in pairs) / max(len(pairs), 1)),
                "optim/lr": self.optimizer.param_groups[0]["lr"],
                "optim/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "optim/update_skipped": 0.0 if success else 1.0,
            })
            tokens = sum(len(p) + len(r) for p, r in pairs)
            local["throughput/tokens_per_s"] = tokens / max(t3 - t0, 1e-9)
        return StepResult(self.step, reduce_to_rank0(local))

    # ----------------------------------------------------------------------------------------------------------
    # the loop

    def train(self, stop_after: Optional[int] = None) -> list[StepResult]:
        """Run to ``schedule.max_steps``. ``stop_after`` ends the loop after that step WITHOUT saving, as if the
        job were killed (tests use it to prove resume exactness)."""
        self.maybe_resume()
        resumed_at = self.step
        flag = self.preemption
        logger = MetricsLogger(self.cfg.logging.dir, self.total_steps, self.step, self.cfg.logging.progress_bar)
        interval = self.cfg.checkpoint.interval
        history = []
        try:
            while self.step < self.total_steps:
                result = self.train_step()
                history.append(result)
                if result.metrics is not None and self.step % self.cfg.logging.interval == 0:
                    logger.log(self.step, result.metrics)
                if stop_after is not None and self.step >= stop_after:
                    break
                if flag.any_rank_received():
                    self.stopped_by_signal = True
                    path = self.save_checkpoint()
                    if dist.get_rank() == 0:
                        log.warning("signal received: saved %s at step %d; exiting for requeue", path, self.step)
                    break
                if interval and self.step % interval == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            else:
                if self.step > resumed_at:  # a job requeued after its last step has nothing new to save
                    self.save_checkpoint()
        finally:
            logger.close()
            flag.restore()
        return history

