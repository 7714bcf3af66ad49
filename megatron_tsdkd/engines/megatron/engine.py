"""The megatron engine: what the one step (engines/trainer.py) needs from megatron-core, and nothing else.

Build: process groups at the plan's TP x PP, both models loaded and sharded for this rank (models/source.py), the
student wrapped in megatron DDP, the co-located stage (colocation.py: teacher and student travel through one 1F1B
schedule) or, when the teacher has a layout of its own, the teacher on its own process groups (teacher_layout.py:
its forward pass first, its hidden states handed to the student's loss ranks), the (distributed) optimizer and its
schedule (optim.py). Step: megatron-core's pipeline schedule over the micro-batches, the last stage computing each
micro-batch's loss on both models' vocab-sharded logits; per-token normalisation by ``finalize_model_grads``
(``calculate_per_token_loss``: the schedule sums token-weighted losses, the gradients are divided by the step's
tokens over all data-parallel ranks). Checkpoints: megatron-core's distributed checkpoints (engines/checkpoint.py:
async, fully parallel, reshardable). Rollouts: our decode, co-generation or a vLLM replica per rank fed by the
weight stream (models/weight_stream.py).
"""
from __future__ import annotations

import logging
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.engines.checkpoint import CheckpointWriter
from megatron_tsdkd.engines.loop import Update
from megatron_tsdkd.engines.megatron.colocation import CoLocatedStage
from megatron_tsdkd.engines.megatron.optim import (adam_step, build_optimizer, build_scheduler,
                                                   materialise_optimizer_state, set_adam_step)
from megatron_tsdkd.engines.megatron.router_aux import RouterAuxLoss
from megatron_tsdkd.engines.megatron.teacher_layout import TeacherOnItsOwnLayout
from megatron_tsdkd.generation.rollout_backends import CoGeneration, MegatronDecode
from megatron_tsdkd.generation.vllm_rollouts import colocated_vllm_rollouts
from megatron_tsdkd.methods import LossContext
from megatron_tsdkd.models import MODEL_KEY, export_hf
from megatron_tsdkd.models.builder import router_aux_loss_overrides
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.hf_config import arch_spec
from megatron_tsdkd.models.source import load_model
from megatron_tsdkd.models.weight_stream import stream_hf_tensors
from megatron_tsdkd.planning.inputs import RunInputs
from megatron_tsdkd.planning.run_config import CONFIG_FILE, config_yaml
from megatron_tsdkd.planning.run_plan import RunPlan
from megatron_tsdkd.runtime import ParallelLayout, device, init_distributed
from megatron_tsdkd.runtime.collectives import broadcast_object

log = logging.getLogger("megatron_tsdkd.train")

# Megatron-LM's default: each rank saves its own optimizer shard (no gather); reshardable over DP only.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def ddp_config(cfg: TrainConfig) -> DistributedDataParallelConfig:
    """megatron DDP settings from ``optimizer.*``. With ``overlap_grad_reduce`` each bucket's reduce(-scatter)
    starts from a backward hook as soon as the last micro-batch (the schedule runs the others under
    ``config.no_sync_func``) has filled it, and ``finalize_model_grads`` waits for them. With
    ``overlap_param_gather`` (distributed optimizer only) the optimizer step updates this rank's shard and the
    all-gather of the rest runs bucket by bucket from forward pre-hooks on the student's modules, in the next
    forward (a rollout's or the schedule's): whoever reads the weights otherwise calls ``sync_student_params``."""
    o = cfg.optimizer
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_grad_reduce=o.overlap_grad_reduce,
        overlap_param_gather=o.overlap_param_gather and o.use_distributed_optimizer,
        bucket_size=o.bucket_size)


def sync_student_params(student) -> None:
    """Collective over the data-parallel group: make every weight of this rank's student current. Needed before
    reading the weights outside a forward (checkpoint save, export) when ``overlap_param_gather`` leaves the
    all-gather of the last step's update to the next forward's pre-hooks; a no-op otherwise."""
    if getattr(student, "use_forward_hook", False):
        student.start_param_sync(force_sync=True)


def _finalize_student_grads(student, _model_chunks, *args, **kwargs):
    finalize_model_grads([student], *args, **kwargs)


class MegatronEngine:
    def __init__(self, cfg: TrainConfig, inputs: RunInputs, plan: RunPlan):
        self.cfg, self.inputs, self.plan = cfg, inputs, plan
        init_distributed(ParallelLayout(plan.layout.tensor, plan.layout.pipeline, expert=plan.layout.expert),
                         seed=cfg.seed)
        self.device, self.dp_rank = device(), ps.get_data_parallel_rank()
        dtype, vocab = DTYPES[cfg.precision.dtype], inputs.tokens.padded_vocab_size
        attention = cfg.models.attention
        # per-token loss: the schedule sums micro-batch losses, finalize_model_grads divides by the step's tokens
        student = load_model(inputs.student, dtype=dtype, padded_vocab_size=vocab, attention_backend=attention,
                             recompute=cfg.models.recompute, calculate_per_token_loss=True,
                             **router_aux_loss_overrides(inputs.student.arch, cfg.models.router_aux_loss_coef))
        self.router_aux = RouterAuxLoss(student)
        self.teacher = self.own_teacher = None
        if inputs.teacher and plan.teacher_has_own_layout:   # its own process groups and forward pass
            self.own_teacher = TeacherOnItsOwnLayout(inputs.teacher, plan.teacher_layout, plan.layout, dtype=dtype,
                                                     padded_vocab=vocab, attention=attention)
        elif inputs.teacher:   # co-located: one pipeline stage each, travelling together through the schedule
            self.teacher = load_model(inputs.teacher, dtype=dtype, padded_vocab_size=vocab,
                                      attention_backend=attention)
        self.student = DistributedDataParallel(config=student.config, ddp_config=ddp_config(cfg), module=student)
        self.stage = CoLocatedStage(self.student, self.teacher)
        self.stage.config.no_sync_func = self.student.no_sync   # all micro-batches but the last accumulate unreduced
        # the schedule hands its model list (the co-located stage); grads live in the student's DDP buffers
        self.stage.config.finalize_model_grads_func = partial(_finalize_student_grads, self.student)
        self.optimizer = build_optimizer(cfg, [self.student], dtype)
        # the schedule multiplies each micro-batch's loss by the loss scale before its backward (fp16; 1 otherwise)
        self.stage.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = build_scheduler(cfg, self.optimizer, plan.total_steps)
        self.schedule = get_forward_backward_func()
        self.checkpoints = CheckpointWriter(cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                                            ps.get_data_parallel_group(with_context_parallel=True))

    # ---- the step ----------------------------------------------------------------------------------------------

    def loss_context(self, diagnose: bool) -> LossContext:
        return LossContext(ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(),
                           self.inputs.tokens.vocab_size, diagnose)

    def computes_losses(self) -> bool:
        """The last pipeline stage computes the losses (and holds what they report)."""
        return ps.is_pipeline_last_stage()

    def forward_backward(self, batches, seq_len: int, loss):
        """megatron-core's schedule over ``batches``; ``loss(batch, student_logits, teacher_logits)`` gives each
        micro-batch's MicroBatchLoss on the last stage. Returns what the losses reported and the phase seconds."""
        clock = self.stage.clock
        clock.pop()
        teacher_hidden = None
        if self.own_teacher is not None:   # the teacher's own forward pass first, its hidden states handed over
            with clock.phase("teacher_forward"):
                teacher_hidden = self.own_teacher.run(batches)

        def forward_step(data_iterator, model):
            index, batch = next(data_iterator)

            def weighted(output):   # the schedule sums these; finalize_model_grads divides by the step's tokens
                student_logits, teacher_logits = output
                if teacher_hidden is not None:
                    teacher_logits = self.own_teacher.logits(teacher_hidden[index])
                m = loss(batch, student_logits, teacher_logits)
                return m.loss * m.tokens, m.tokens.to(torch.int), m.reported
            return model(batch.input_ids, batch.position_ids, None), weighted

        self.optimizer.zero_grad()
        self.student.zero_grad_buffer()
        with clock.phase("schedule"):   # device time on GPU (events), wall time on CPU
            reported = self.schedule(forward_step_func=forward_step, data_iterator=enumerate(batches),
                                     model=[self.stage],
                                     num_microbatches=self.plan.micro_batches, seq_length=seq_len,
                                     micro_batch_size=self.plan.micro_size, forward_only=False,
                                     **self.stage.schedule_arguments(batches))
        self.router_aux.collect(self.plan.micro_batches)
        phases = clock.pop()
        teacher, student = phases.get("teacher_forward", 0.0), phases.get("student_forward", 0.0)
        return reported, {"teacher_forward": teacher, "student_forward": student,
                          "student_backward": max(phases["schedule"] - student
                                                  - (teacher if self.own_teacher is None else 0.0), 0.0)}

    def step_values(self) -> dict:
        """The last step's engine-side values to log (device scalars): a MoE student's loss/router_aux."""
        return self.router_aux.values()

    def optimizer_step(self, step: int) -> Update:
        lr = self.optimizer.param_groups[0]["lr"]   # the rate this step applies
        applied, grad_norm, _ = self.optimizer.step()
        if applied:   # an fp16 overflow skips the update; the schedule waits for it (as Megatron-LM's does)
            self.scheduler.step(increment=1)
        return Update(applied, grad_norm, lr, self.optimizer.get_loss_scale())

    def from_loss_ranks(self, value):
        """``value`` as the last pipeline stage holds it, on every rank of the pipeline group."""
        return broadcast_object(value, ps.get_pipeline_model_parallel_last_rank(),
                                ps.get_pipeline_model_parallel_group())

    # ---- rollouts ------------------------------------------------------------------------------------------------

    def rollout_backend(self, name: str, method):
        student = unwrap_model(self.student)
        if name == "co-generation":   # both models pick each token (SKD, MiniLLM): the co-located teacher joins
            return CoGeneration(student, unwrap_model(self.teacher), method.co_sampling(), self.inputs.tokens)
        if name == "vllm":
            r, bucket = self.cfg.rollout, self.cfg.rollout.weight_sync_bucket_mb << 20
            return colocated_vllm_rollouts(
                self.inputs.student.meta_dir, dtype=DTYPES[self.cfg.precision.dtype], tokens=self.inputs.tokens,
                max_model_len=self.cfg.data.max_prompt_length + r.max_new_tokens, max_rows=self.plan.rows_per_rank,
                memory_fraction=r.vllm_memory_fraction, seed=self.cfg.seed,
                stream_weights=lambda: self.student_hf_tensors(bucket), group=ps.get_model_parallel_group())
        return MegatronDecode(student, self.inputs.tokens)

    def student_hf_tensors(self, bucket_bytes: int):
        """The student's weights as HF tensors, streamed to every rank of its model-parallel group (the vLLM
        sync), in buckets of ``bucket_bytes``."""
        sync_student_params(self.student)   # overlap_param_gather: the last step's weights
        return stream_hf_tensors(unwrap_model(self.student), arch_spec(self.inputs.student.hf_config),
                                 bucket_bytes=bucket_bytes)

    # ---- checkpoints and export ------------------------------------------------------------------------------------

    def _sharded_state(self, trainer_state: dict, is_loading: bool) -> dict:
        if is_loading:
            materialise_optimizer_state(self.optimizer)
        model_sd = unwrap_model(self.student).sharded_state_dict()   # the same keys as models.save_mcore_weights
        state = {**trainer_state, "adam_step": adam_step(self.optimizer), "scheduler": self.scheduler.state_dict()}
        return {MODEL_KEY: model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                               metadata=OPTIMIZER_FORMAT),
                "trainer": state}

    def save(self, step: int, trainer_state: dict, resolved_cfg: TrainConfig) -> str:
        sync_student_params(self.student)   # overlap_param_gather: the last step's weights
        return self.checkpoints.save(step, self._sharded_state(trainer_state, is_loading=False),
                                     self.inputs.student.meta_dir, {CONFIG_FILE: config_yaml(resolved_cfg)})

    def finalize(self, blocking: bool) -> None:
        self.checkpoints.finalize(blocking)

    def load(self, folder: str, trainer_state: dict) -> dict:
        state = self.checkpoints.load(folder, self._sharded_state(trainer_state, is_loading=True))
        with torch.no_grad():   # the optimizer copies into (views of) the parameters in place
            unwrap_model(self.student).load_state_dict(state[MODEL_KEY], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        trainer = state["trainer"]
        set_adam_step(self.optimizer, trainer["adam_step"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        return trainer

    def export_hf(self, out_dir: str) -> None:
        sync_student_params(self.student)   # overlap_param_gather: the last step's weights
        export_hf(unwrap_model(self.student), out_dir, self.inputs.student.meta_dir)

    def accuracy_model(self):
        """The student as generation and evaluation take it (the job's before/after accuracy)."""
        return unwrap_model(self.student)

    def log_summary_lines(self) -> None:
        """This engine adds nothing to the start-up summary."""
