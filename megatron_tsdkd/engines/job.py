"""The whole job behind ``tsdkd-train``, for both engines: optional accuracy before, training, HF export, accuracy
after.

Before/after accuracy runs when ``data.eval`` names a JSONL with answers (greedy decoding of the student, in the
same processes and layout as training; the megatron engine only: with DeepSpeed, evaluate the export). The export is
the engine's own (megatron: the converter's writer, exactly what ``tools/convert.py mcore-to-hf`` would produce from
the final checkpoint; DeepSpeed: ``save_pretrained`` of the gathered student). A job stopped by a signal skips both:
it has saved a checkpoint and will be resumed. The accuracies also go to TensorBoard as ``eval/accuracy`` at step 0
(before) and at the final step (after).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch.distributed as dist

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.engines.metrics import log_scalars
from megatron_tsdkd.engines.trainer import Trainer, build_trainer
from megatron_tsdkd.eval.accuracy import evaluate_accuracy
from megatron_tsdkd.planning.inputs import RunInputs
from megatron_tsdkd.planning.run_plan import RunPlan

log = logging.getLogger("megatron_tsdkd.job")


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _accuracy(trainer: Trainer, model):
    inputs = trainer.inputs
    return evaluate_accuracy(model, inputs.chat.tokenizer, list(inputs.eval_examples), tokens=inputs.tokens,
                             max_new_tokens=trainer.cfg.rollout.max_new_tokens)


def run_job(cfg: TrainConfig, inputs: Optional[RunInputs] = None, plan: Optional[RunPlan] = None) -> Trainer:
    trainer = build_trainer(cfg, inputs, plan)
    model = trainer.engine.accuracy_model() if trainer.inputs.eval_examples else None
    before = None
    if model is not None and trainer.plan.resume_folder is None:
        trainer.log_summary()   # before the evaluation, which may take minutes
        before = _accuracy(trainer, model)
        _say(f"student accuracy before distillation on {cfg.data.eval}: {before}")
        log_scalars(cfg.logging.dir, 0, {"eval/accuracy": before.accuracy})
    trainer.train(summary=before is None)
    if trainer.stopped_by_signal:
        _say(f"stopped by a signal at step {trainer.step}; the checkpoint is in {cfg.checkpoint.dir}")
        trainer.close()   # last: a vLLM replica's shutdown ends the default process group
        return trainer
    if cfg.checkpoint.export_hf:
        trainer.engine.export_hf(cfg.checkpoint.export_hf)
        _say(f"exported the student as a Hugging Face model to {cfg.checkpoint.export_hf}")
    if model is not None:
        after = _accuracy(trainer, model)
        change = f"{before} -> {after}" if before is not None else f"{after}"
        _say(f"student accuracy on {cfg.data.eval} after {trainer.step} steps of {cfg.method.name}: {change}")
        log_scalars(cfg.logging.dir, trainer.step, {"eval/accuracy": after.accuracy})
    _say(f"training finished at step {trainer.step}")
    trainer.close()   # last: a vLLM replica's shutdown ends the default process group
    return trainer
