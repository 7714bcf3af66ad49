"""Gather a megatron model's TP/PP shards back to Hugging Face tensors and write a loadable HF folder.

Each pipeline stage is assembled on its first TP rank (of data-parallel replica 0) from an all-gather over its TP
group, and written by that rank as its own safetensors shard(s): no rank ever holds more than one stage. A MoE
model's experts are written by each expert-parallel rank's own writer, so no rank holds more than its experts. Rank 0
writes model.safetensors.index.json and the HF metadata (config, generation config, tokenizer files) after all
ranks agreed on the file plan. Every file goes through the one atomic writer (runtime/atomic_files.py): complete
or absent, with the mode the umask gives (safetensors alone would leave the weights 0600).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.models.hf_config import arch_spec
from megatron_tsdkd.models.hf_weights import INDEX_FILE
from megatron_tsdkd.models.mapping import hf_tensor_shapes, model_layouts
from megatron_tsdkd.models.mcore_checkpoint import copy_hf_meta
from megatron_tsdkd.runtime.atomic_files import write_atomic, write_json_atomic, write_text_atomic
from megatron_tsdkd.runtime.collectives import all_gather_objects, barrier

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
EXPORT_MARKER = "tsdkd_export.json"   # written last: the folder is a complete export of ours, safe to replace


def written_by_export(folder: str) -> bool:
    """Whether ``folder`` holds a complete earlier export (re-running a finished job may replace it)."""
    return os.path.isfile(os.path.join(folder, EXPORT_MARKER))


def gathered_shards(local: torch.Tensor, layout, tp: int, group) -> list[torch.Tensor]:
    """Every TP rank's shard of one parameter (collective over the TP group when the layout splits it; a
    replicated parameter is the same on every rank), for ``ShardLayout.scatter`` of each rank's layout."""
    if layout.tp_split and tp > 1:
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=group)
        return shards
    return [local] * tp


def gather_stage_hf_tensors(model, spec, dtype: Optional[torch.dtype] = None, assemble: bool = True,
                            experts_only: bool = False) -> dict[str, torch.Tensor]:
    """Collective over the TP group: this stage's full HF tensors (empty where ``assemble`` is False); a MoE
    model's experts are this expert-parallel rank's (only those with ``experts_only``)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    params = dict(model.named_parameters())
    shapes = hf_tensor_shapes(spec)
    per_rank = [model_layouts(model, spec, tp_rank=r) for r in range(tp)]
    hf: dict[str, torch.Tensor] = {}
    for i, layout in enumerate(per_rank[0]):
        if experts_only and not layout.expert:
            continue
        shards = gathered_shards(params[layout.mcore_name].detach(), layout, tp, group)
        if not layout.export or not assemble:
            continue
        for r in range(tp if layout.tp_split else 1):
            rank_layout = per_rank[r][i]
            for piece in rank_layout.pieces:
                if piece.hf_name not in hf:
                    hf[piece.hf_name] = torch.empty(shapes[piece.hf_name], dtype=dtype or shards[r].dtype)
            rank_layout.scatter(shards[r].cpu(), hf)
    return hf


def _plan(sizes_per_stage: list[list[tuple[str, int]]], max_shard_bytes: int) -> list[list[tuple[int, list[str]]]]:
    """Split each stage's tensors into files of at most ``max_shard_bytes`` (a stage never shares a file)."""
    plan = []
    for sizes in sizes_per_stage:
        files, current, current_bytes = [], [], 0
        for name, nbytes in sizes:
            if current and current_bytes + nbytes > max_shard_bytes:
                files.append(current)
                current, current_bytes = [], 0
            current.append(name)
            current_bytes += nbytes
        if current:
            files.append(current)
        plan.append(files)
    return plan


def export_hf(model, out_dir: str, hf_meta_dir: str, *, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Collective over all ranks: write ``model`` as a Hugging Face folder (safetensors shards + index + metadata).

    ``hf_meta_dir`` holds the source config.json, generation_config.json and tokenizer files (e.g. a checkpoint's
    hf_meta/). ``dtype`` defaults to the model's params_dtype; config.json records the one written.
    """
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file
    from transformers import AutoConfig

    spec = arch_spec(AutoConfig.from_pretrained(hf_meta_dir, local_files_only=True))
    dtype = dtype or model.config.params_dtype  # every parameter has it (models/builder.py casts the norms too)
    # One writer per stage: TP rank 0 of data-parallel replica 0; for a MoE model one per stage and expert-parallel
    # rank (expert-data-parallel replica 0), each writing its own experts, EP rank 0 the rest of the stage too.
    if spec.is_moe:
        ep_rank, replica = ps.get_expert_model_parallel_rank(), ps.get_expert_data_parallel_rank()
    else:
        ep_rank, replica = 0, ps.get_data_parallel_rank()
    writer = replica == 0 and ps.get_context_parallel_rank() == 0
    tensors: dict[str, torch.Tensor] = {}
    if writer:
        writer = ps.get_tensor_model_parallel_rank() == 0
        tensors = gather_stage_hf_tensors(model, spec, dtype, assemble=writer, experts_only=ep_rank > 0)
    part = (ps.get_pipeline_model_parallel_rank(), ep_rank)
    mine = (part, [(n, t.numel() * t.element_size()) for n, t in tensors.items()]) if writer else None
    everyone = all_gather_objects(mine)
    parts = sorted(x for x in everyone if x is not None)
    plan = _plan([sizes for _, sizes in parts], max_shard_bytes)
    total_files = sum(len(files) for files in plan)
    names = [f"model-{i + 1:05d}-of-{total_files:05d}.safetensors" for i in range(total_files)]

    files_in_order = [(parts[i][0], members) for i, files in enumerate(plan) for members in files]
    weight_map = {n: names[i] for i, (_, members) in enumerate(files_in_order) for n in members}
    missing = set(hf_tensor_shapes(spec)) - set(weight_map)
    if missing:  # a mapping bug, not a user error; every rank raises alike
        raise RuntimeError(f"export would lose tensors {sorted(missing)[:5]}")

    if dist.get_rank() == 0:
        if written_by_export(out_dir):  # an earlier export of a finished run: replaced whole, no stale shards
            shutil.rmtree(out_dir)
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    for i, (owner, members) in enumerate(files_in_order):
        if writer and owner == part:
            shard = {n: tensors[n].contiguous() for n in members}
            write_atomic(os.path.join(out_dir, names[i]), lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    if dist.get_rank() == 0:
        total = sum(nbytes for _, sizes in parts for _, nbytes in sizes)
        write_json_atomic(os.path.join(out_dir, INDEX_FILE),
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        copy_hf_meta(hf_meta_dir, out_dir)
        _record_dtype(os.path.join(out_dir, "config.json"), dtype)
        write_json_atomic(os.path.join(out_dir, EXPORT_MARKER), {"files": total_files, "dtype": str(dtype)})
    barrier()


def _record_dtype(config_path: str, dtype: torch.dtype) -> None:
    """Let config.json state the dtype of the written tensors (``dtype``; ``torch_dtype`` for transformers 4)."""
    with open(config_path) as f:
        config = json.load(f)
    name = str(dtype).removeprefix("torch.")   # transformers' names: float32, bfloat16, float16
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
