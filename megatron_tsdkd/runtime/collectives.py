"""Collectives on the project's own data (metrics, flags, counts, Python objects), on the device the group needs.

An NCCL group moves only CUDA tensors of the process's current device; a gloo group only CPU tensors. Model
activations and logits already live on the right device, and the code that owns them (losses, generation, weight
export) hands them to torch.distributed directly. Everything else goes through here, so the device choice is
made once: ``group_device(group)`` from ``torch.distributed.get_backend(group)`` (the rule megatron-core uses:
NCCL -> ``torch.cuda.current_device()``, anything else -> CPU; a mixed "cpu:gloo,cuda:nccl" group takes CPU
tensors). Object collectives and barriers on NCCL run on ``torch.cuda.current_device()`` too, so every helper
first makes sure this process is bound to its own GPU (``LOCAL_RANK``), not left on GPU 0.

Each function is a collective over ``group`` (None: the world; ``src``/``dst`` are global ranks, as in
torch.distributed) that every rank of the group must call, and a local no-op in a world of one
(torch.distributed not initialised).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

Values = Union[Sequence[float], Sequence[int], torch.Tensor]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _needs_cuda(group) -> bool:
    backend = str(dist.get_backend(group)).lower()
    return "nccl" in backend and "gloo" not in backend


def _bind_cuda_device() -> torch.device:
    """This process's CUDA device. A process still on the default GPU 0 whose LOCAL_RANK (or SLURM_LOCALID) names
    another GPU has not called torch.cuda.set_device: bind it, or every rank's NCCL call would land on GPU 0."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if local is not None and torch.cuda.current_device() == 0:
        index = int(local) % max(torch.cuda.device_count(), 1)
        if index != 0:
            torch.cuda.set_device(index)
    return torch.device("cuda", torch.cuda.current_device())


def group_device(group=None) -> torch.device:
    """Where a tensor for a collective over ``group`` must live: the current CUDA device for NCCL, else the CPU."""
    if _initialized() and _needs_cuda(group):
        return _bind_cuda_device()
    return torch.device("cpu")


def _packed(values: Values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a new 1-D tensor of ``dtype`` on ``device``; a tensor argument is left unchanged. A sequence may
    mix numbers and 0-d tensors (e.g. a step's host timings and its device loss sums): the numbers go over in one
    host-to-device copy, the tensors are stacked where they live; nothing is read back to the host."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device=device, dtype=dtype, copy=True)
    values = list(values)
    held = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if not held:
        return torch.tensor(values, dtype=dtype, device=device)
    out = torch.empty(len(values), dtype=dtype, device=device)
    numbers = [i for i in range(len(values)) if not isinstance(values[i], torch.Tensor)]
    if numbers:
        out[numbers] = torch.tensor([values[i] for i in numbers], dtype=dtype, device=device)
    out[held] = torch.stack([values[i].detach().reshape(()).to(dtype) for i in held]).to(device=device)
    return out


def all_reduce_values(values: Values, op=dist.ReduceOp.SUM, group=None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``values`` (numbers and 0-d tensors, or a tensor that is left unchanged) reduced over ``group``, as a new
    tensor of ``dtype`` on ``group_device(group)``. Reading it (``.tolist()``, ``.item()``) is a host sync on GPU:
    do it once."""
    out = _packed(values, group_device(group), dtype)
    if _initialized():
        dist.all_reduce(out, op=op, group=group)
    return out


def broadcast_values(values: Optional[Values], count: int, src: int, group=None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Global rank ``src``'s ``count`` values (as ``all_reduce_values`` takes them; ignored elsewhere, None is
    fine) on every rank of ``group``, as a new tensor of ``dtype`` on ``group_device(group)``: a tensor broadcast,
    so the receivers must know ``count`` (e.g. from metric names every rank knows), unlike ``broadcast_object``."""
    device = group_device(group)
    if not _initialized() or dist.get_rank() == src:
        out = _packed(values, device, dtype)
        if out.numel() != count:
            raise ValueError(f"broadcast_values: {out.numel()} values from rank {src}, but {count} announced")
    else:
        out = torch.empty(count, dtype=dtype, device=device)
    if _initialized():
        dist.broadcast(out, src=src, group=group)
    return out


def any_true(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is True on any rank of ``group``."""
    return bool(all_reduce_values([int(bool(flag))], op=dist.ReduceOp.MAX, group=group, dtype=torch.int64).item())


def sum_counts(counts: Sequence[int], group=None) -> list[int]:
    """Integer counts summed over ``group`` (exact: int64)."""
    return [int(c) for c in all_reduce_values(counts, group=group, dtype=torch.int64).tolist()]


def _object_collective(group) -> bool:
    """Whether a collective runs at all; binds the CUDA device first where the group is NCCL."""
    if not _initialized():
        return False
    group_device(group)
    return True


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """``obj`` of global rank ``src`` (picklable), returned on every rank of ``group``."""
    if not _object_collective(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group=None) -> list:
    """Every rank's ``obj``, in group-rank order, on every rank of ``group``."""
    if not _object_collective(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_objects(obj: Any, dst: int = 0, group=None) -> Optional[list]:
    """Every rank's ``obj`` in group-rank order on global rank ``dst``; None on the other ranks."""
    if not _object_collective(group):
        return [obj]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (on NCCL, on this process's own GPU)."""
    if _object_collective(group):
        dist.barrier(group=group)
