"""Where a model comes from, resolved once and loaded one way, for training, evaluation, teacher data and export.

A model path is one of
- a Hugging Face folder (``config.json`` + safetensors), read slice by slice per rank;
- a megatron-core distributed checkpoint (``metadata.json``; its Hugging Face config and tokenizer in ``hf_meta/``),
  saved by ``tsdkd-convert`` or by the trainer at any TP/PP layout;
- a training run's checkpoint folder: its ``latest`` marker names the newest complete checkpoint.

``resolve_model_source`` answers which, before any process group exists, with one sentence naming the path when it
is none of them; ``load_model`` builds this rank's stage and fills it (collective over the model-parallel group).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tsdkd.models.builder import build_model
from megatron_tsdkd.models.dtypes import SAFETENSORS_DTYPES, default_dtype
from megatron_tsdkd.models.errors import ModelError
from megatron_tsdkd.models.hf_config import ArchSpec, arch_spec, read_hf_config
from megatron_tsdkd.models.hf_weights import HFWeightFiles, check_hf_weights, load_hf_weights
from megatron_tsdkd.models.mcore_checkpoint import HF_META_DIR, checkpoint_dtype, load_mcore_weights, resolve_checkpoint
from megatron_tsdkd.runtime.placement import assert_placed

FORMATS = ("auto", "hf", "mcore")


@dataclass(frozen=True)
class ModelSource:
    path: str            # as the user gave it
    format: str          # "hf" | "mcore"
    weights: str         # the HF folder, or the checkpoint folder itself (a run folder's `latest` followed)
    meta_dir: str        # config.json, tokenizer and generation_config.json live here
    hf_config: object

    @property
    def arch(self) -> ArchSpec:
        return arch_spec(self.hf_config)

    def check_weights(self) -> None:
        """Every weight file present and whole, every tensor of the shape the config implies (no tensor data is
        read): a broken download stops here, not in the middle of loading on every rank."""
        if self.format == "hf":
            check_hf_weights(self.weights, self.hf_config)
        else:
            checkpoint_dtype(self.weights)  # reads the checkpoint's metadata: absent or foreign weights fail here

    def saved_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        if self.format == "mcore":
            return checkpoint_dtype(self.weights)

        return SAFETENSORS_DTYPES.get(HFWeightFiles(self.weights).dtype(), torch.float32)


def resolve_model_source(path: str, format: str = "auto") -> ModelSource:
    """Which kind of model ``path`` is, and where its config and tokenizer are. ModelError names the path."""
    if format not in FORMATS:
        raise ModelError(f"model format {format!r} is not one of {', '.join(FORMATS)}")
    if not os.path.isdir(path):
        raise ModelError(f"{path} is not a folder")
    if format == "hf" or (format == "auto" and os.path.isfile(os.path.join(path, "config.json"))):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(path, "hf", path, path, _read_config(path))
    try:
        checkpoint = resolve_checkpoint(path)
    except ModelError:
        if format == "mcore":
            raise
        raise ModelError(f"{path} is neither a Hugging Face folder (config.json) nor a megatron-core checkpoint "
                         f"(metadata.json) nor a training run folder (a 'latest' marker)") from None
    meta = next((d for d in (os.path.join(checkpoint, HF_META_DIR), os.path.join(path, HF_META_DIR))
                 if os.path.isfile(os.path.join(d, "config.json"))), None)
    if meta is None:
        raise ModelError(f"{checkpoint} has no {HF_META_DIR}/config.json, so its architecture and tokenizer are "
                         f"unknown; convert it with tsdkd-convert or pass the Hugging Face folder")
    return ModelSource(path, "mcore", checkpoint, meta, _read_config(meta))


def _read_config(folder: str):
    try:
        return read_hf_config(folder)
    except ModelError:
        raise
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder}: {error}") from None


def load_model(source: ModelSource, *, dtype: Optional[torch.dtype] = None, padded_vocab_size: Optional[int] = None,
               **build_kwargs):
    """This rank's stage of ``source``, weights loaded (collective over the model-parallel group), every tensor on
    this rank's device. ``dtype`` defaults to the checkpoint's own for megatron checkpoints, else bf16 on GPU and
    fp32 on CPU."""
    if dtype is None:
        dtype = source.saved_dtype() if source.format == "mcore" else default_dtype()
    build_kwargs.setdefault("perform_initialization", False)  # every weight is overwritten by the load
    model = build_model(source.hf_config, params_dtype=dtype, padded_vocab_size=padded_vocab_size, **build_kwargs)
    if source.format == "hf":
        load_hf_weights(model, source.weights, source.hf_config)
    else:
        load_mcore_weights(model, source.weights)
    assert_placed(model)   # the loaders copy into the placed tensors; one that swapped a tensor would show here
    return model
