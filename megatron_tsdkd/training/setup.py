"""Everything the trainer needs from models, tokenizer and data, checked before any process group exists.

``prepare(cfg)`` reads both models' Hugging Face configs, the shared tokenizer and the training data, and stops
with one sentence naming the culprit (unsupported architecture, heads not divisible by TP, tokenizers that differ,
a malformed data line). What it returns builds this rank's model stages and batches once the groups are up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tsdkd.config import TrainConfig


class PreflightError(ValueError):
    """A problem with the models, tokenizer or data that the user must fix; one sentence naming the culprit."""


def tokenizer_difference(a, b) -> Optional[str]:
    """None when two tokenizers encode identically (same vocabulary and special tokens), else what differs."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = len(set(va.items()) - set(vb.items()))
        only_b = len(set(vb.items()) - set(va.items()))
        return f"vocabularies differ ({len(va)} vs {len(vb)} entries; {only_a} / {only_b} token-id pairs not shared)"
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} differs ({getattr(a, name, None)!r} vs {getattr(b, name, None)!r})"
    return None


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


@dataclass
class ModelSource:
    role: str              # "student" | "teacher"
    path: str
    format: str            # "hf" | "mcore"
    hf_config: object
    hf_dir: str            # where config.json / tokenizer live (an mcore checkpoint keeps them in hf_meta/)


class TrainingSetup:
    def __init__(self, cfg: TrainConfig, student: ModelSource, teacher: Optional[ModelSource], tokenizer, dataset):
        from megatron_tsdkd.data import ChatTemplateTokenizer

        self.cfg = cfg
        self.student = student
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.chat = ChatTemplateTokenizer(tokenizer)
        self.examples = dataset.examples
        self.data_stats = dataset.stats
        self.vocab_size = len(tokenizer)
        self.student_hf_meta = student.hf_dir

    # ---- models (after process groups exist) ----
    def padded_vocab_size(self) -> int:
        """Teacher and student laid on one padded vocabulary (the planner uses the same rule)."""
        from megatron.core import parallel_state as ps
        from megatron_tsdkd.models import arch_spec
        from megatron_tsdkd.training.memory_plan import shared_padded_vocab

        specs = [arch_spec(m.hf_config) for m in (self.student, self.teacher) if m is not None]
        return shared_padded_vocab(specs, ps.get_tensor_model_parallel_world_size())

    def _build(self, source: ModelSource, dtype: torch.dtype):
        from megatron_tsdkd.models import build_model, load_hf_weights, load_mcore_weights

        model = build_model(source.hf_config, params_dtype=dtype, padded_vocab_size=self.padded_vocab_size())
        if source.format == "hf":
            load_hf_weights(model, source.path)
        else:
            load_mcore_weights(model, source.path)
        return model

    def build_student(self, dtype: torch.dtype):
        return self._build(self.student, dtype)

    def build_teacher(self, dtype: torch.dtype):
        if self.teacher is None:
            raise PreflightError("models.teacher.path: this method needs a teacher")
        return self._build(self.teacher, dtype)

    # ---- data ----
    def make_sampler(self, prompts_per_step: int, dp_rank: int, dp_size: int):
        from megatron_tsdkd.data import DistributedBatchSampler

        return DistributedBatchSampler(len(self.examples), global_batch_size=prompts_per_step, dp_rank=dp_rank,
                                       dp_size=dp_size, seed=self.cfg.seed, shuffle=self.cfg.data.shuffle)

    def collate(self, pairs, micro_size: int, device) -> tuple[list[dict], int]:
        """(prompt, response) pairs -> micro-batches of one common length (the pipeline's p2p buffers need one
        shape per step). Responses are cut to ``data.max_length``; the targets follow ``data.collate``'s mask rule."""
        from megatron_tsdkd.data import collate_training

        limit = self.cfg.data.max_length
        pairs = [(p, list(r)[:max(limit - len(p), 0)]) for p, r in pairs]
        length = max(len(p) + len(r) for p, r in pairs)
        batches = []
        for start in range(0, len(pairs), micro_size):
            b = collate_training(pairs[start:start + micro_size], self.pad_token_id, pad_to=length)
            batches.append({"input_ids": b.input_ids.to(device), "position_ids": b.position_ids.to(device),
                            "labels": b.labels.to(device), "loss_mask": b.loss_mask.to(device)})
        return batches, length

    @property
    def pad_token_id(self) -> int:
        return self.chat.pad_id

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted({self.chat.end_of_turn_id, self.tokenizer.eos_token_id} - {None})

    def load_eval_examples(self) -> list:
        from megatron_tsdkd.data import load_chat_dataset

        if not self.cfg.data.eval:
            return []
        d = self.cfg.data
        return load_chat_dataset(d.eval, self.tokenizer, mode="on_policy", max_length=d.max_length,
                                 max_prompt_length=d.max_prompt_length).examples

    def generate(self, model, prompts, rollout, seed: int):
        from megatron_tsdkd.generation import SamplingConfig, generate

        sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                  top_p=rollout.top_p, top_k=rollout.top_k, greedy=rollout.greedy,
                                  num_samples=rollout.num_samples)
        out = generate(model, prompts, sampling, eos_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id,
                       vocab_size=self.vocab_size, generator_seed=seed)
        return out.responses


def _model_source(role: str, key: str, path: str, fmt: str) -> ModelSource:
    from megatron_tsdkd.models import UnsupportedModelError, read_hf_config

    if not os.path.isdir(path):
        raise PreflightError(f"{key}: {path} is not a folder")
    hf_dir = os.path.join(path, "hf_meta") if fmt == "mcore" else path
    try:
        hf_config = read_hf_config(hf_dir)
    except (UnsupportedModelError, OSError, ValueError) as error:
        raise PreflightError(f"{key}: {error}") from None
    return ModelSource(role, path, fmt, hf_config, hf_dir)


def prepare(cfg: TrainConfig) -> TrainingSetup:
    from transformers import AutoTokenizer

    from megatron_tsdkd.data import DataFormatError, load_chat_dataset
    from megatron_tsdkd.models import check_parallel_layout

    m = cfg.models
    student = _model_source("student", "models.student.path", m.student.path, m.student.format)
    teacher = None
    if m.teacher.path:
        teacher = _model_source("teacher", "models.teacher.path", m.teacher.path, m.teacher.format)
    for source, key in ((student, "models.student"), (teacher, "models.teacher")):
        if source is None:
            continue
        try:
            check_parallel_layout(source.hf_config, cfg.parallel.tensor, cfg.parallel.pipeline)
        except ValueError as error:
            raise PreflightError(f"{key}: {error}") from None

    tokenizer_dir = m.tokenizer or student.hf_dir
    if not _has_tokenizer(tokenizer_dir):
        raise PreflightError(f"models.tokenizer: no tokenizer files in {tokenizer_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if teacher is not None and _has_tokenizer(teacher.hf_dir):
        difference = tokenizer_difference(tokenizer, AutoTokenizer.from_pretrained(teacher.hf_dir))
        if difference:
            raise PreflightError(f"models.teacher.path: the teacher's tokenizer differs from the student's: {difference}")
    for source in (student, teacher):
        if source is not None and source.hf_config.vocab_size < len(tokenizer):
            raise PreflightError(f"models.{source.role}.path: embedding has {source.hf_config.vocab_size} rows but the "
                                 f"tokenizer has {len(tokenizer)} tokens")
    if not os.path.isfile(cfg.data.train):
        raise PreflightError(f"data.train: {cfg.data.train} does not exist")
    mode = "on_policy" if cfg.rollout.on_policy_prob >= 1.0 else "off_policy"  # off-policy steps need responses
    try:
        dataset = load_chat_dataset(cfg.data.train, tokenizer, mode=mode, max_length=cfg.data.max_length,
                                    max_prompt_length=cfg.data.max_prompt_length)
    except (DataFormatError, ValueError) as error:
        raise PreflightError(f"data.train: {error}") from None
    export = cfg.checkpoint.export_hf
    if export and os.path.isdir(export) and os.listdir(export):
        raise PreflightError(f"checkpoint.export_hf: {export} is not empty; remove it or choose another folder")
    if cfg.data.eval and not os.path.isfile(cfg.data.eval):
        raise PreflightError(f"data.eval: {cfg.data.eval} does not exist")
    return TrainingSetup(cfg, student, teacher, tokenizer, dataset)
