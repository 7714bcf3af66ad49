"""The whole job behind ``tsdkd-train``: optional accuracy before, training, HF export, accuracy after.

Before/after accuracy runs when ``data.eval`` names a JSONL with answers (greedy decoding of the student, in the
same processes and layout as training). The export uses the converter's own writer (models.export_hf), so the
folder is exactly what ``tools/convert.py mcore-to-hf`` would produce from the final checkpoint. A job stopped by a
signal skips both: it has saved a checkpoint and will be resumed.
"""
from __future__ import annotations

import logging

import torch.distributed as dist

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.training import checkpoint
from megatron_tsdkd.training.colocation import unwrap
from megatron_tsdkd.training.setup import TrainingSetup
from megatron_tsdkd.training.trainer import Trainer

log = logging.getLogger("megatron_tsdkd.job")


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _accuracy(trainer: Trainer, examples):
    from megatron_tsdkd.eval.accuracy import evaluate_accuracy

    s = trainer.setup
    return evaluate_accuracy(unwrap(trainer.student), s.tokenizer, examples, stop_token_ids=s.stop_token_ids,
                             pad_token_id=s.pad_token_id, vocab_size=s.vocab_size,
                             max_new_tokens=trainer.cfg.rollout.max_new_tokens)


def run_job(cfg: TrainConfig, setup: TrainingSetup) -> Trainer:
    trainer = Trainer(cfg, setup)
    _say(f"data {cfg.data.train}: {setup.data_stats.summary()}")
    eval_examples = setup.load_eval_examples()
    fresh = cfg.checkpoint.resume == "none" or checkpoint.latest_checkpoint(cfg.checkpoint.dir) is None
    before = _accuracy(trainer, eval_examples) if eval_examples and fresh else None
    if before is not None:
        _say(f"student accuracy before distillation on {cfg.data.eval}: {before}")
    trainer.train()
    if trainer.stopped_by_signal:
        _say(f"stopped by a signal at step {trainer.step}; the checkpoint is in {cfg.checkpoint.dir}")
        return trainer
    if cfg.checkpoint.export_hf:
        from megatron_tsdkd.models import export_hf

        export_hf(unwrap(trainer.student), cfg.checkpoint.export_hf, setup.student.hf_dir)
        _say(f"exported the student as a Hugging Face model to {cfg.checkpoint.export_hf}")
    if eval_examples:
        after = _accuracy(trainer, eval_examples)
        change = f"{before} -> {after}" if before is not None else f"{after}"
        _say(f"student accuracy on {cfg.data.eval} after {trainer.step} steps of {cfg.method.name}: {change}")
    _say(f"training finished at step {trainer.step}")
    return trainer
