"""The DeepSpeed engine's settings, pure functions of the config: the learning-rate schedule (megatron-core's,
value for value), the DeepSpeed configs of student and teacher, the parameter groups, and how a Hugging Face model
is loaded (partitioned under ZeRO-3)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from megatron_tsdkd.config import TrainConfig


def lr_at(cfg: TrainConfig, total_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): megatron-core's OptimizerParamScheduler with the
    arguments engines/megatron/optim.py gives it (linear warm-up from 0, then cosine / linear decay to min_lr, or constant)."""
    o, s = cfg.optimizer, cfg.schedule
    warmup = int(round(s.warmup_fraction * total_steps))
    decay_steps = max(total_steps, warmup + 1)
    init_lr = 0.0 if warmup else o.lr
    if warmup > 0 and step <= warmup:
        return init_lr + (o.lr - init_lr) * step / warmup
    if s.decay == "constant":
        return o.lr
    if step > decay_steps:
        return o.min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    coeff = 1.0 - ratio if s.decay == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return o.min_lr + coeff * (o.lr - o.min_lr)


def ds_config(cfg: TrainConfig, dp_size: int, micro_size: int) -> dict:
    """The student's DeepSpeed config (``micro_size``: the run plan's micro-batch)."""
    d, o, b = cfg.deepspeed, cfg.optimizer, cfg.batch
    zero = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    adam = {"lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps, "weight_decay": o.weight_decay}
    if d.optimizer == "torch_adam":
        adam["torch_adam"] = True
    config = {
        "train_batch_size": b.global_size,
        "train_micro_batch_size_per_gpu": micro_size,
        "gradient_accumulation_steps": b.global_size // (dp_size * micro_size),
        "gradient_clipping": o.clip_grad,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": d.optimizer == "cpu_adam",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision.dtype == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def teacher_ds_config(cfg: TrainConfig, micro_size: int) -> dict:
    """The frozen teacher's DeepSpeed config: ZeRO-3 inference, no optimizer."""
    config = {"train_micro_batch_size_per_gpu": micro_size, "zero_optimization": {"stage": 3},
              "steps_per_print": 10**9}
    if cfg.precision.dtype in ("bf16", "fp16"):
        config[cfg.precision.dtype] = {"enabled": True}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default rule: no weight decay for biases and 1-D parameters (norms). A parameter built under
    ZeRO-3's zero.Init holds an empty placeholder; its real shape is ``ds_shape``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            dims = len(getattr(param, "ds_shape", param.shape))
            (no_decay if dims == 1 or name.endswith(".bias") else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def load_hf_model(source, dtype: torch.dtype, zero3_config: Optional[dict] = None) -> torch.nn.Module:
    """The HF model of ``source`` in ``dtype``. With ``zero3_config`` (the DeepSpeed config of the ZeRO-3 engine it
    will join) it is loaded partitioned, so no rank ever holds a full copy (issue 27): transformers builds it under
    ``deepspeed.zero.Init`` (each module's parameters split over the ranks as soon as the module exists, on the
    accelerator), then fills one module at a time: the ranks all-gather that module, rank 0 copies its tensors from
    the memory-mapped checkpoint, DeepSpeed re-partitions. Every rank maps the shard files; only rank 0 reads them.
    Without it (a ZeRO-2 student: ZeRO-2 replicates parameters, so every rank needs the whole student anyway; a
    teacher kept as a full copy per rank) every rank loads the whole model.

    transformers finds the config through a weak global reference to the last ``HfDeepSpeedConfig`` made: this one
    is held for the load only and dropped after, so the student's and the teacher's loads each see their own, and
    nothing later (generate, save_pretrained) sees one, as before."""
    if zero3_config is None:
        return AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype)
    live = HfDeepSpeedConfig(zero3_config)
    if not live.is_zero3():
        raise ValueError("load_hf_model: zero3_config must be a ZeRO stage 3 config")
    try:
        return AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()
        del live
