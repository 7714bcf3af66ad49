"""Hugging Face folder <-> megatron-core distributed checkpoint (the ``tsdkd-convert`` command, commands/convert.py).

How it runs: every check that a user can fail (architecture, TP/PP divisibility, weight files, target folder) runs
first, in the calling process, before any process group exists. Then the work needs a world of TP x PP ranks, each
holding one shard: under ``torchrun --nproc-per-node N`` (or any launcher that sets RANK/WORLD_SIZE) it uses that
world (NCCL on GPUs); started as a single process it spawns the N ranks itself on this machine, on the CPU with
gloo (conversion is I/O bound; no GPU is needed). The distributed checkpoint is reshardable, so TP/PP here only
choose how the work and memory are split (and EP, a MoE model's experts); the trainer may load it at any layout.
"""
from __future__ import annotations

import os
import shutil
import socket
from typing import Callable, Optional

import torch

from megatron_tsdkd.models.errors import ModelError, TargetFolderError
from megatron_tsdkd.models.hf_config import check_parallel_layout
from megatron_tsdkd.models.hf_export import export_hf
from megatron_tsdkd.models.mcore_checkpoint import save_mcore_weights
from megatron_tsdkd.models.source import load_model, resolve_model_source
from megatron_tsdkd.runtime import ParallelLayout, destroy, init_distributed
from megatron_tsdkd.runtime.collectives import barrier


def check_target(path: str, force: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuse a non-empty target unless ``force``; never let ``force`` delete a source folder."""
    if not os.path.exists(path):
        return
    if os.path.isdir(path) and not os.listdir(path):
        return
    if not force:
        raise TargetFolderError(f"target folder {path} is not empty; choose another folder or pass --force to "
                                f"replace it")
    target = os.path.realpath(path)
    for source in sources:
        source = os.path.realpath(source)
        if source == target or source.startswith(target + os.sep):
            raise TargetFolderError(f"--force would delete the source {source}, which is inside target {path}")


def _clear_target(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _start_rank(tp: int, pp: int, out_dir: str, force: bool, ep: int = 1) -> None:
    """Process groups for this rank; rank 0 clears a forced target before anyone writes."""
    import torch.distributed as dist

    init_distributed(ParallelLayout(tensor=tp, pipeline=pp, expert=ep))
    if force and dist.get_rank() == 0:
        _clear_target(out_dir)
    barrier()


def hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int, dtype: torch.dtype, force: bool = False,
                     ep: int = 1) -> None:
    """One rank's share of hf-to-mcore: load its shard from safetensors and save it in the distributed checkpoint."""
    _start_rank(tp, pp, out_dir, force, ep)
    source = resolve_model_source(hf_dir, "hf")
    save_mcore_weights(load_model(source, dtype=dtype), out_dir, hf_meta_src=source.meta_dir)


def mcore_to_hf_rank(mcore_dir: str, out_dir: str, tp: int, pp: int, dtype: Optional[torch.dtype],
                     force: bool = False, ep: int = 1) -> None:
    """One rank's share of mcore-to-hf: load its shard from the distributed checkpoint, then export together."""
    _start_rank(tp, pp, out_dir, force, ep)
    source = resolve_model_source(mcore_dir, "mcore")
    export_hf(load_model(source), out_dir, source.meta_dir, dtype=dtype)


def _spawned_rank(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    fn(*args)


def run_world(world_size: int, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on every rank of a world of ``world_size``: the launcher's, or one spawned here."""
    import torch.distributed as dist

    launched = dist.is_initialized() or "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if launched:
        found = dist.get_world_size() if dist.is_initialized() else int(
            os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        if found != world_size:
            raise ModelError(f"the launcher started {found} processes but --tp x --pp x --ep = {world_size}")
        owns_group = not dist.is_initialized()
        fn(*args)
        if owns_group:
            destroy()
        return
    if world_size == 1:
        try:
            fn(*args)
        finally:
            destroy()
        return
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_spawned_rank, args=(world_size, port, fn, args), nprocs=world_size, join=True,
                           start_method="spawn")
    except ProcessException as error:  # a rank raised (last traceback line kept) or was killed (e.g. out of memory)
        last = str(error).strip().splitlines()[-1]
        raise ModelError(f"a conversion rank failed: {last}") from None


def prepare_conversion(command: str, source_path: str, out: str, tp: int, pp: int, dtype: Optional[torch.dtype],
                       force: bool, ep: int = 1) -> tuple[Callable, tuple]:
    """Every check a user can fail, before any process group; returns the per-rank function and its arguments.
    ``command``: "hf-to-mcore" or "mcore-to-hf"; ``dtype`` None keeps the source's; ``ep``: a MoE model's experts
    split over that many ranks (the world is tp x pp x ep)."""
    source = resolve_model_source(source_path, "hf" if command == "hf-to-mcore" else "mcore")
    check_parallel_layout(source.hf_config, tp, pp, ep=ep)
    check_target(out, force, sources=(source.weights,))
    if command == "hf-to-mcore":
        source.check_weights()
        return hf_to_mcore_rank, (source.weights, out, tp, pp, dtype or source.saved_dtype(), force, ep)
    return mcore_to_hf_rank, (source.weights, out, tp, pp, dtype, force, ep)
