"""A model's weights as a megatron-core distributed checkpoint (reshardable across TP/PP), plus its HF metadata.

The model part of the sharded state dict lives under ``MODEL_KEY`` so the trainer can add optimizer and scheduler
state beside it in the same checkpoint, and the converter can read the model out of a training checkpoint.
Vocabulary padding may differ between save and load (megatron marks the embedding and output layer
``allow_shape_mismatch``): rows absent from the checkpoint load as zeros.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.models.errors import ModelError
from megatron_tsdkd.models.run_folder import read_latest
from megatron_tsdkd.runtime.atomic_files import write_text_atomic
from megatron_tsdkd.runtime.collectives import barrier

MODEL_KEY = "model"
HF_META_DIR = "hf_meta"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def model_sharded_state_dict(model) -> dict:
    """``{MODEL_KEY: model.sharded_state_dict()}``: the piece of a checkpoint that holds the weights. The replicas
    are counted over the model's own data-parallel group (megatron takes parallel_state's unless told), so a model
    on process groups of its own (a teacher with its own layout) reads its shards too."""
    return {MODEL_KEY: model.sharded_state_dict(metadata={"dp_cp_group": model.pg_collection.dp_cp})}


def copy_hf_meta(src_dir: str, dst_dir: str) -> list[str]:
    """Copy every top-level non-weight file (config, generation config, tokenizer, chat template, license...).
    Contents only: the copies get the umask's mode, not the source's (a private source folder must not make a
    team's checkpoint or export unreadable)."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES:
            continue
        shutil.copyfile(path, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


def is_mcore_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "metadata.json"))


def resolve_checkpoint(folder: str) -> str:
    """``folder`` itself, or the step folder a training run's ``latest`` marker names."""
    if not is_mcore_checkpoint(folder):
        folder = read_latest(folder) or folder
    if not is_mcore_checkpoint(folder):
        raise ModelError(f"{folder} is not a megatron-core distributed checkpoint (no metadata.json)")
    return folder


def checkpoint_dtype(folder: str) -> torch.dtype:
    """The params_dtype the weights were saved in (from the checkpoint's metadata, no tensor data). Read from a
    linear layer: the norms of older checkpoints are fp32 whatever the params_dtype."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(folder)
    key = "decoder.layers.self_attention.linear_qkv.weight"
    if key not in metadata:
        raise ModelError(f"{folder} holds no GPT model weights (no {key})")
    return metadata[key].dtype


def save_mcore_weights(model, folder: str, hf_meta_src: Optional[str] = None) -> None:
    """Collective. Write the model (this rank's shard) to an empty or new ``folder``; copy HF metadata beside it."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), folder)
    if dist.get_rank() == 0 and hf_meta_src:
        copy_hf_meta(hf_meta_src, os.path.join(folder, HF_META_DIR))
    barrier()


def load_mcore_weights(model, folder: str) -> None:
    """Collective. Load this rank's shard of the model from a checkpoint saved at any TP/PP layout."""
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(folder)
    state = dist_checkpointing.load(model_sharded_state_dict(model), folder)
    model.load_state_dict(state[MODEL_KEY], strict=True)
