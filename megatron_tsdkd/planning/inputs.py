"""Everything a run reads from disk, checked before any process group exists: the models' sources, the shared
tokenizer and its token spec, the training data and the evaluation data.

``check_inputs(cfg)`` stops with ``PreflightError``, one sentence naming the config key and the culprit (a folder
that is no model, weights missing or truncated, an unsupported architecture, heads not divisible by TP, tokenizers
that differ, a malformed data line). What it returns is plain data: the trainer's builder turns it into models and
batches once the groups are up.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.config import TrainConfig, teacher_layout_of
from megatron_tsdkd.data import ChatDataset, ChatTemplateTokenizer, DataFormatError, TokenizedExample, load_chat_dataset
from megatron_tsdkd.data.token_cache import resolve_cache_dir
from megatron_tsdkd.kpod.samples import check_schedule_settings, load_kpod_dataset
from megatron_tsdkd.methods import method_class
from megatron_tsdkd.models import ModelError, check_parallel_layout
from megatron_tsdkd.models.hf_export import written_by_export
from megatron_tsdkd.models.source import ModelSource, resolve_model_source
from megatron_tsdkd.models.token_spec import TokenSpec, load_tokenizer, token_spec


class PreflightError(ValueError):
    """A problem with the models, tokenizer or data that the user must fix; one sentence naming the culprit."""


@dataclass(frozen=True)
class RunInputs:
    student: ModelSource
    teacher: Optional[ModelSource]          # None when the method needs none
    chat: ChatTemplateTokenizer             # the shared tokenizer with its chat template
    tokens: TokenSpec
    train: ChatDataset
    eval_examples: tuple[TokenizedExample, ...] = ()


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


def _source(key: str, model_cfg, layout: tuple[int, int, int], layout_key: str, trained: bool = False) -> ModelSource:
    """The model at ``key``, split evenly by its (tensor, pipeline, expert) ``layout`` (set by ``layout_key``;
    ``trained``: the student)."""
    try:
        source = resolve_model_source(model_cfg.path, model_cfg.format)
    except (ModelError, OSError) as error:
        raise PreflightError(f"{key}: {error}") from None
    try:
        tensor, pipeline, expert = layout
        check_parallel_layout(source.hf_config, tensor, pipeline, ep=expert, trained=trained)
    except ModelError as error:
        raise PreflightError(f"{layout_key}: {error} ({key}={model_cfg.path})") from None
    try:
        source.check_weights()
    except (ModelError, OSError) as error:
        raise PreflightError(f"{key}: {error}") from None
    return source


def _dataset(key: str, path: str, chat: ChatTemplateTokenizer, cfg: TrainConfig, mode: str) -> ChatDataset:
    if not os.path.exists(path):
        raise PreflightError(f"{key}: {path} does not exist")

    cache_dir = resolve_cache_dir(cfg.data.cache_dir, cfg.logging.dir)
    _usable_folder("data.cache_dir", cache_dir or "")
    try:   # tokenised once into data.cache_dir (one process builds, the others wait), then memory-mapped
        return load_chat_dataset(path, chat.tokenizer, mode=mode, max_length=cfg.data.max_length,
                                 max_prompt_length=cfg.data.max_prompt_length, fields=cfg.data.fields,
                                 cache_dir=cache_dir)
    except (DataFormatError, ValueError, OSError) as error:
        raise PreflightError(f"{key}: {error}") from None


def _kpod_dataset(train: ChatDataset, cfg: TrainConfig) -> ChatDataset:
    try:
        check_schedule_settings(cfg.method)
        return load_kpod_dataset(train, cfg.method.prepared_dir, cfg.method.use_token_weights)
    except (OSError, ValueError) as error:
        raise PreflightError(f"method.prepared_dir: {error}") from None


def _hf_folders_only(student: ModelSource, teacher: Optional[ModelSource]) -> None:
    """engine=deepspeed trains transformers models: a megatron-core checkpoint source must be exported first."""
    for key, source in (("models.student.path", student), ("models.teacher.path", teacher)):
        if source is not None and source.format != "hf":
            raise PreflightError(f"{key}: {source.path} is a megatron-core checkpoint; engine=deepspeed loads Hugging "
                                 f"Face folders only: export it first (tsdkd-convert mcore-to-hf --mcore "
                                 f"{source.path} --out <folder>) or use engine=megatron")


def check_inputs(cfg: TrainConfig) -> RunInputs:
    """Read and check every input of ``cfg`` (it is not changed): model sources, tokenizer, token spec, data."""
    p = cfg.parallel
    student = _source("models.student.path", cfg.models.student, (p.tensor, p.pipeline, p.expert), "parallel",
                      trained=True)
    teacher = None
    if method_class(cfg.method.name).needs_teacher:
        teacher_key = ("parallel.teacher" if teacher_layout_of(p) != (p.tensor, p.pipeline) or p.teacher.expert != 1
                       else "parallel")
        teacher = _source("models.teacher.path", cfg.models.teacher, (*teacher_layout_of(p), p.teacher.expert),
                          teacher_key)
    if cfg.engine == "deepspeed":
        _hf_folders_only(student, teacher)
        moe = next((key for key, s in (("models.student.path", student), ("models.teacher.path", teacher))
                    if s is not None and s.arch.is_moe), None)
        if moe:
            raise PreflightError(f"{moe}: mixture-of-experts models run on engine=megatron (megatron-core's MoE "
                                 f"layers, expert parallelism); engine=deepspeed trains dense models only")
    try:
        tokenizer = load_tokenizer(cfg.models.tokenizer or student.meta_dir)
        chat = ChatTemplateTokenizer(tokenizer)
    except (ModelError, ValueError) as error:
        raise PreflightError(f"models.tokenizer: {error}") from None
    if teacher is not None:
        try:
            difference = tokenizer_difference(tokenizer, load_tokenizer(teacher.meta_dir))
        except ModelError:
            difference = None  # a teacher without tokenizer files uses the student's
        if difference:
            raise PreflightError(f"models.teacher.path: the teacher's tokenizer differs from the student's: {difference}")
    try:
        # every model's vocabulary shards are equal at both tensor-parallel sizes (the teacher's head is re-sharded
        # over the student's, engines/megatron/teacher_layout.py)
        tokens = token_spec(chat, [s for s in (student, teacher) if s is not None],
                            math.lcm(p.tensor, teacher_layout_of(p)[0]))
    except ModelError as error:
        raise PreflightError(f"models: {error}") from None
    mode = "on_policy" if cfg.rollout.on_policy_prob >= 1.0 else "off_policy"  # off-policy steps need responses
    _check_outputs(cfg)   # before the data: its cache lives beside the outputs, and tokenising is the slow part
    train = _dataset("data.train", cfg.data.train, chat, cfg, mode)
    if cfg.method.name == "kpod":   # its per-epoch weighted samples, from the prepared artefacts
        train = _kpod_dataset(train, cfg)
    eval_examples = _dataset("data.eval", cfg.data.eval, chat, cfg, "on_policy").examples if cfg.data.eval else []
    unanswered = next((e.source for e in eval_examples if e.answer is None), None)
    if unanswered:
        raise PreflightError(f"data.eval: {unanswered} has no \"answer\"; every evaluation problem needs one")
    return RunInputs(student, teacher, chat, tokens, train, tuple(eval_examples))


def launcher_world_size() -> int:
    """The world the launcher starts (torchrun's WORLD_SIZE, else Slurm's task count), 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def launcher_ranks_per_node() -> int:
    """The processes the launcher starts on this node (torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node,
    else the whole world: one node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
               or launcher_world_size())


def _usable_folder(key: str, path: str) -> None:
    """``path`` is a folder, or can become one: it is no file, and its nearest existing parent is writable."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"{key}: {path} is a file, not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(f"{key}: cannot create or write {path} ({parent} is not a writable folder)")


def _check_outputs(cfg: TrainConfig) -> None:
    for key, path in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.dir", cfg.logging.dir),
                      ("checkpoint.export_hf", cfg.checkpoint.export_hf)):
        _usable_folder(key, path)
    export = cfg.checkpoint.export_hf
    if export and os.path.isdir(export) and os.listdir(export) and not written_by_export(export):
        raise PreflightError(f"checkpoint.export_hf: {export} is not empty and holds no earlier export; remove it "
                             f"or choose another folder")
