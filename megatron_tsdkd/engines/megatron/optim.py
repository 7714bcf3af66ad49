"""megatron-core's (distributed) optimizer and its cosine/linear schedule with warm-up, from the config."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_tsdkd.config import TrainConfig

MIN_LOSS_SCALE = 2.0 ** -10   # fp16's dynamic loss scale never falls below this


def build_optimizer(cfg: TrainConfig, model_chunks: list, params_dtype: torch.dtype):
    """megatron-core's optimizer over ``model_chunks`` (DDP-wrapped). fp16 gets megatron's dynamic loss scaler;
    the losses reach it only through ``config.grad_scale_func = optimizer.scale_loss`` on the schedule's model
    config (engines/megatron/build.py), which scales each micro-batch's loss before its backward. Without that the
    scaler would divide gradients that were never multiplied, and the updates would vanish."""
    o = cfg.optimizer
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16, params_dtype=params_dtype,
        use_distributed_optimizer=o.use_distributed_optimizer,
        # fp16 only. The floor is below megatron's 1.0: a token-sum loss over a long micro-batch can overflow fp16
        # even unscaled, and a floor of 1 would then skip every step.
        initial_loss_scale=o.loss_scale_initial, loss_scale_window=o.loss_scale_window,
        hysteresis=o.loss_scale_hysteresis, min_loss_scale=MIN_LOSS_SCALE,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    o, s = cfg.optimizer, cfg.schedule
    warmup = int(round(s.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style=s.decay, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        # resumed with accepted changes (checkpoint.allow_config_changes): the new settings win over the stored ones
        override_opt_param_scheduler=cfg.checkpoint.allow_config_changes,
        use_checkpoint_opt_param_scheduler=not cfg.checkpoint.allow_config_changes,
    )


def materialise_optimizer_state(optimizer) -> None:
    """Give every parameter zero Adam state (step 0) if it has none, so a fresh optimizer can describe the state
    it is about to load. megatron-core 0.16's DistributedOptimizer (torch fallback, no Apex/TE) reads each state's
    'step' in ``sharded_state_dict(is_loading=True)`` before it creates its own placeholders; the load then
    overwrites these values in place."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)



def _adam_states(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from opt.optimizer.state.values()


def adam_step(optimizer) -> float:
    """Adam's step count (bias correction). Saved by the trainer itself: megatron-core 0.16's dp_reshardable
    optimizer checkpoint on the torch fallback (no Apex/TE) restores the moments but not this count."""
    steps = {float(state["step"]) for state in _adam_states(optimizer) if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"Adam step counts differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def set_adam_step(optimizer, step: float) -> None:
    """One tensor PER parameter: torch's Adam increments it in place (a shared tensor would count n times)."""
    for state in _adam_states(optimizer):
        if "step" in state:
            state["step"] = torch.tensor(float(step))
