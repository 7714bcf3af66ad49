"""The whole job behind ``tsdkd-train``: optional accuracy before, training, HF export, accuracy after.

Before/after accuracy runs when ``data.eval`` names a JSONL with answers (greedy decoding of the student, in the
same processes and layout as training). The export uses the converter's own writer (models.export_hf), so the
folder is exactly what ``tools/convert.py mcore-to-hf`` would produce from the final checkpoint. A job stopped by a
signal skips both: it has saved a checkpoint and will be resumed. The accuracies also go to TensorBoard as
``eval/accuracy`` at step 0 (before) and at the final step (after).
"""
from __future__ import annotations

import logging

import torch.distributed as dist
from megatron.core.utils import unwrap_model

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.training import checkpoint
from megatron_tsdkd.training.build import sync_student_params
from megatron_tsdkd.training.inputs import RunInputs
from megatron_tsdkd.training.metrics import log_scalars, log_startup_summary
from megatron_tsdkd.training.trainer import Trainer, build_trainer

log = logging.getLogger("megatron_tsdkd.job")


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _accuracy(trainer: Trainer):
    from megatron_tsdkd.eval.accuracy import evaluate_accuracy

    inputs = trainer.parts.inputs
    return evaluate_accuracy(unwrap_model(trainer.student), inputs.chat.tokenizer, list(inputs.eval_examples),
                             tokens=inputs.tokens, max_new_tokens=trainer.cfg.rollout.max_new_tokens)


def run_job(cfg: TrainConfig, inputs: RunInputs) -> Trainer:
    if cfg.engine == "deepspeed":   # HF models with ZeRO: training/deepspeed_engine.py
        from megatron_tsdkd.training.deepspeed_engine import run_deepspeed_job

        return run_deepspeed_job(cfg, inputs)
    trainer = build_trainer(cfg, inputs)
    resume = cfg.checkpoint.resume
    fresh = resume == "none" or (resume == "auto" and checkpoint.latest_checkpoint(cfg.checkpoint.dir) is None)
    before = None
    if inputs.eval_examples and fresh:
        log_startup_summary(cfg, trainer.parts, start_step=0)   # before the evaluation, which may take minutes
        before = _accuracy(trainer)
        _say(f"student accuracy before distillation on {cfg.data.eval}: {before}")
        log_scalars(cfg.logging.dir, 0, {"eval/accuracy": before.accuracy})
    trainer.train(summary=before is None)
    if trainer.stopped_by_signal:
        _say(f"stopped by a signal at step {trainer.step}; the checkpoint is in {cfg.checkpoint.dir}")
        trainer.close()
        return trainer
    if cfg.checkpoint.export_hf:
        from megatron_tsdkd.models import export_hf

        sync_student_params(trainer.student)   # overlap_param_gather: the last step's weights (training/build.py)
        export_hf(unwrap_model(trainer.student), cfg.checkpoint.export_hf, inputs.student.meta_dir)
        _say(f"exported the student as a Hugging Face model to {cfg.checkpoint.export_hf}")
    if inputs.eval_examples:
        after = _accuracy(trainer)
        change = f"{before} -> {after}" if before is not None else f"{after}"
        _say(f"student accuracy on {cfg.data.eval} after {trainer.step} steps of {cfg.method.name}: {change}")
        log_scalars(cfg.logging.dir, trainer.step, {"eval/accuracy": after.accuracy})
    _say(f"training finished at step {trainer.step}")
    trainer.close()   # last: vLLM's shutdown ends the default process group
    return trainer
