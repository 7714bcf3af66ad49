"""Turn a validated config and its checked inputs into the parts a Trainer runs: process groups, the memory gate,
both models (loaded and sharded for this rank), the co-located stage, the method, the data sampler, the optimizer
and its schedule. The Trainer receives them built and only runs the loop."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.data import DistributedBatchSampler, training_sampler
from megatron_tsdkd.methods import DistillationMethod, build_method
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.source import load_model
from megatron_tsdkd.training.colocation import CoLocatedStage
from megatron_tsdkd.training.inputs import RunInputs, check_inputs
from megatron_tsdkd.training.preemption import PreemptionFlag


@dataclass
class TrainingParts:
    inputs: RunInputs
    student: torch.nn.Module                  # this rank's student stage, wrapped in megatron DDP
    teacher: Optional[torch.nn.Module]        # this rank's frozen teacher stage, or None
    stage: CoLocatedStage                     # both, as the pipeline schedule sees them
    method: DistillationMethod
    sampler: DistributedBatchSampler
    optimizer: object                         # megatron-core (distributed) optimizer
    scheduler: object
    total_steps: int
    num_microbatches: int                     # per optimizer step on this data-parallel rank
    preemption: PreemptionFlag
    memory_plan: object
    rollouts: object = None                   # VllmRollouts with rollout.engine=vllm, else None (megatron decode)


def _finalize_student_grads(student, _model_chunks, *args, **kwargs):
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([student], *args, **kwargs)


def ddp_config(cfg: TrainConfig):
    """megatron DDP settings from ``optimizer.*``. With ``overlap_grad_reduce`` each bucket's reduce(-scatter)
    starts from a backward hook as soon as the last micro-batch (the schedule runs the others under
    ``config.no_sync_func``) has filled it, and ``finalize_model_grads`` waits for them. With
    ``overlap_param_gather`` (distributed optimizer only) the optimizer step updates this rank's shard and the
    all-gather of the rest runs bucket by bucket from forward pre-hooks on the student's modules, in the next
    forward (a rollout's or the schedule's): whoever reads the weights otherwise calls ``sync_student_params``."""
    from megatron.core.distributed import DistributedDataParallelConfig

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


def build_parts(cfg: TrainConfig, inputs: Optional[RunInputs] = None) -> TrainingParts:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel

    from megatron_tsdkd.runtime import ParallelLayout, init_distributed
    from megatron_tsdkd.training.optim import build_optimizer, build_scheduler

    preemption = PreemptionFlag()              # first: a signal during model loading must not be lost
    inputs = inputs or check_inputs(cfg)       # every user error (and the memory plan) before any process group
    init_distributed(ParallelLayout(cfg.parallel.tensor, cfg.parallel.pipeline), seed=cfg.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    b = cfg.batch
    if b.global_size % (dp_size * b.micro_size):
        raise ValueError(f"batch.global_size ({b.global_size}) must be a multiple of data-parallel size "
                         f"({dp_size}) x batch.micro_size ({b.micro_size})")
    if (b.global_size // dp_size) % cfg.rollout.num_samples:
        raise ValueError(f"rollout.num_samples ({cfg.rollout.num_samples}) must divide the per-rank batch "
                         f"({b.global_size // dp_size} sequences)")

    dtype, vocab = DTYPES[cfg.precision.dtype], inputs.tokens.padded_vocab_size
    # per-token loss: the schedule sums micro-batch losses, finalize_model_grads divides by the step's tokens
    attention = cfg.models.attention
    student = load_model(inputs.student, dtype=dtype, padded_vocab_size=vocab, attention_backend=attention,
                         recompute=cfg.models.recompute, calculate_per_token_loss=True)
    teacher = (load_model(inputs.teacher, dtype=dtype, padded_vocab_size=vocab, attention_backend=attention)
               if inputs.teacher else None)
    student = DistributedDataParallel(config=student.config, ddp_config=ddp_config(cfg), module=student)
    stage = CoLocatedStage(student, teacher)
    stage.config.no_sync_func = student.no_sync   # all micro-batches but the last accumulate without reducing
    # the schedule hands its model list (the co-located stage); grads live in the student's DDP buffers
    stage.config.finalize_model_grads_func = partial(_finalize_student_grads, student)

    sampler = training_sampler(inputs.train, cfg.data, b.global_size // cfg.rollout.num_samples, dp_rank, dp_size,
                               cfg.seed)
    total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * sampler.batches_per_epoch
    optimizer = build_optimizer(cfg, [student], dtype)
    # the schedule multiplies each micro-batch's loss by the loss scale before its backward (fp16; 1 otherwise)
    stage.config.grad_scale_func = optimizer.scale_loss
    return TrainingParts(inputs, student, teacher, stage, build_method(cfg.method), sampler, optimizer,
                         build_scheduler(cfg, optimizer, total_steps), total_steps,
                         b.global_size // (dp_size * b.micro_size), preemption, inputs.memory_plan,
                         build_vllm_rollouts(cfg, inputs, partial(student_hf_tensors, student, inputs,
                                                                  cfg.rollout.weight_sync_bucket_mb),
                                             ps.get_model_parallel_group(), b.global_size // dp_size))


def student_hf_tensors(student, inputs: RunInputs, bucket_mb: int = 256):
    """The student's weights as HF tensors, streamed to every rank of its model-parallel group (the vLLM sync), in
    buckets of ``bucket_mb`` MiB (rollout.weight_sync_bucket_mb)."""
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.models.hf_config import arch_spec
    from megatron_tsdkd.models.weight_stream import stream_hf_tensors

    sync_student_params(student)   # overlap_param_gather: the last step's weights
    return stream_hf_tensors(unwrap_model(student), arch_spec(inputs.student.hf_config), bucket_bytes=bucket_mb << 20)


def build_vllm_rollouts(cfg: TrainConfig, inputs: RunInputs, stream_weights, group, rows_per_rank: int):
    """The colocated vLLM replica of this rank and its rollout driver (generation/vllm_rollouts.py) when
    ``rollout.engine`` resolved to vllm (training/inputs.py); None otherwise. Both engines build it here."""
    if cfg.rollout.engine != "vllm":
        return None
    from megatron_tsdkd.generation.vllm_replica import VllmReplica
    from megatron_tsdkd.generation.vllm_rollouts import VllmRollouts

    r = cfg.rollout
    replica = VllmReplica(inputs.student.meta_dir, dtype=DTYPES[cfg.precision.dtype],
                          vocab_size=inputs.tokens.vocab_size,
                          max_model_len=cfg.data.max_prompt_length + r.max_new_tokens, max_rows=rows_per_rank,
                          memory_fraction=r.vllm_memory_fraction, seed=cfg.seed)
    return VllmRollouts(replica, stream_weights, group)
