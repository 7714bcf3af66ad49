"""``tsdkd-convert``: Hugging Face folder <-> megatron-core distributed checkpoint.

    tsdkd-convert hf-to-mcore --hf DIR --out DIR --tp N --pp N [--dtype bf16|fp16|fp32] [--force]
    tsdkd-convert mcore-to-hf --mcore DIR --out DIR [--tp N --pp N] [--dtype ...] [--force]

How it runs: every check that a user can fail (architecture, TP/PP divisibility, weight files, target folder) runs
first, in the calling process, before any process group exists. Then the work needs a world of TP x PP ranks, each
holding one shard: under ``torchrun --nproc-per-node N`` (or any launcher that sets RANK/WORLD_SIZE) it uses that
world (NCCL on GPUs); started as a single process it spawns the N ranks itself on this machine, on the CPU with
gloo (conversion is I/O bound; no GPU is needed). The distributed checkpoint is reshardable, so TP/PP here only
choose how the work and memory are split; the trainer may load it at any layout.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from typing import Callable, Optional

import torch

from megatron_tsdkd.models.errors import ModelError, TargetFolderError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


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


def _start_rank(tp: int, pp: int, out_dir: str, force: bool) -> None:
    """Process groups for this rank; rank 0 clears a forced target before anyone writes."""
    import torch.distributed as dist

    from megatron_tsdkd.runtime import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(tensor=tp, pipeline=pp))
    if force and dist.get_rank() == 0:
        _clear_target(out_dir)
    dist.barrier()


def hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int, dtype: torch.dtype, force: bool = False) -> None:
    """One rank's share of hf-to-mcore: load its shard from safetensors and save it in the distributed checkpoint."""
    from megatron_tsdkd.models.builder import build_model
    from megatron_tsdkd.models.hf_config import read_hf_config
    from megatron_tsdkd.models.hf_weights import load_hf_weights
    from megatron_tsdkd.models.mcore_checkpoint import save_mcore_weights

    _start_rank(tp, pp, out_dir, force)
    config = read_hf_config(hf_dir)
    model = build_model(config, params_dtype=dtype, perform_initialization=False)
    load_hf_weights(model, hf_dir, config)
    save_mcore_weights(model, out_dir, hf_meta_src=hf_dir)


def mcore_to_hf_rank(mcore_dir: str, out_dir: str, tp: int, pp: int, dtype: Optional[torch.dtype],
                     force: bool = False) -> None:
    """One rank's share of mcore-to-hf: load its shard from the distributed checkpoint, then export together."""
    from megatron_tsdkd.models.builder import build_model
    from megatron_tsdkd.models.hf_config import read_hf_config
    from megatron_tsdkd.models.hf_export import export_hf
    from megatron_tsdkd.models.mcore_checkpoint import HF_META_DIR, checkpoint_dtype, load_mcore_weights

    _start_rank(tp, pp, out_dir, force)
    meta = os.path.join(mcore_dir, HF_META_DIR)
    model = build_model(read_hf_config(meta), params_dtype=checkpoint_dtype(mcore_dir), perform_initialization=False)
    load_mcore_weights(model, mcore_dir)
    export_hf(model, out_dir, meta, dtype=dtype)


def _spawned_rank(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    fn(*args)


def run_world(world_size: int, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on every rank of a world of ``world_size``: the launcher's, or one spawned here."""
    import torch.distributed as dist

    from megatron_tsdkd.runtime import destroy

    launched = dist.is_initialized() or "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if launched:
        found = dist.get_world_size() if dist.is_initialized() else int(
            os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        if found != world_size:
            raise ModelError(f"the launcher started {found} processes but --tp x --pp = {world_size}")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsdkd-convert",
                                     description="Hugging Face folder <-> megatron-core distributed checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron-core distributed checkpoint")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> Hugging Face folder")
    to_hf.add_argument("--mcore", required=True, help="checkpoint folder (or a training run folder with 'latest')")
    for p, need_layout in ((to_mcore, True), (to_hf, False)):
        p.add_argument("--out", required=True, help="target folder (must be empty or absent unless --force)")
        p.add_argument("--tp", type=int, required=need_layout, default=1, help="tensor-parallel ranks")
        p.add_argument("--pp", type=int, required=need_layout, default=1, help="pipeline-parallel ranks")
        p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the source's dtype")
        p.add_argument("--force", action="store_true", help="replace a non-empty target folder")
    return parser


def _prepare(args) -> tuple[Callable, tuple]:
    """All user-facing checks; returns the per-rank function and its arguments."""
    from megatron_tsdkd.models.hf_config import check_parallel_layout, read_hf_config
    from megatron_tsdkd.models.hf_weights import HFWeightFiles, check_hf_weights
    from megatron_tsdkd.models.mcore_checkpoint import HF_META_DIR, resolve_checkpoint

    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.command == "hf-to-mcore":
        if not os.path.isdir(args.hf):
            raise ModelError(f"--hf {args.hf} is not a folder")
        config = read_hf_config(args.hf)
        check_parallel_layout(config, args.tp, args.pp)
        check_hf_weights(args.hf, config)
        check_target(args.out, args.force, sources=(args.hf,))
        dtype = dtype or _SAFETENSORS_DTYPES.get(HFWeightFiles(args.hf).dtype(), torch.float32)
        return hf_to_mcore_rank, (args.hf, args.out, args.tp, args.pp, dtype, args.force)
    if not os.path.isdir(args.mcore):
        raise ModelError(f"--mcore {args.mcore} is not a folder")
    folder = resolve_checkpoint(args.mcore)
    meta = os.path.join(folder, HF_META_DIR)
    if not os.path.isfile(os.path.join(meta, "config.json")):
        raise ModelError(f"{folder} has no {HF_META_DIR}/config.json, so the Hugging Face architecture is unknown")
    config = read_hf_config(meta)
    check_parallel_layout(config, args.tp, args.pp)
    check_target(args.out, args.force, sources=(folder,))
    return mcore_to_hf_rank, (folder, args.out, args.tp, args.pp, dtype, args.force)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        fn, fn_args = _prepare(args)
        run_world(args.tp * args.pp, fn, *fn_args)
    except (ModelError, OSError) as error:
        raise SystemExit(f"tsdkd-convert: error: {error}") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"tsdkd-convert: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
