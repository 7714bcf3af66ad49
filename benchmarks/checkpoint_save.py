"""How long a checkpoint save stops training: synchronous vs asynchronous (``checkpoint.async_save``).

    .venv/bin/python benchmarks/checkpoint_save.py                       # CPU: spawns --ranks gloo processes
    torchrun --nproc-per-node 8 benchmarks/checkpoint_save.py --hidden 4096 --layers 32   # a GPU node
    .venv/bin/python benchmarks/checkpoint_save.py --smoke              # tiny, one rank in this process: seconds

Saves the trainer's checkpoint state (a Llama-shaped megatron-core GPTModel in DDP, its distributed Adam state in
the trainer's format) through engines/checkpoint.py's CheckpointWriter, alternating the two modes ``--repeats``
times so a busy machine slows both alike, and prints per mode the median blocking time (the ``save`` call: what
the training loop waits for) and the total time until the checkpoint is published (``latest`` moved), and their
ratios, measured in one run. Data-parallel ranks > 1 exercise the fully parallel save (the replicated weights are
split over the ranks). What an asynchronous save still blocks for: megatron-core's planning (metadata
collectives, the sharding validation), the copy of this rank's shards to host memory (on the CPU, a copy of the
tensors that are views, i.e. DDP's parameter buffer) and the fork of the writing process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_state(args):
    """This rank's model (DDP) and distributed optimizer with Adam state, as the trainer holds them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from transformers import LlamaConfig

    from megatron_tsdkd.models import build_model
    from megatron_tsdkd.engines.megatron.optim import materialise_optimizer_state

    hf = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                     num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 128, 1),
                     num_key_value_heads=max(args.hidden // 512, 1), max_position_embeddings=4096,
                     tie_word_embeddings=False)
    model = build_model(hf, params_dtype=torch.float32)
    model = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, params_dtype=torch.float32,
                                                       use_distributed_optimizer=True), [model])
    materialise_optimizer_state(optimizer)
    return model, optimizer


def sharded_state(model, optimizer) -> dict:
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.models import MODEL_KEY
    from megatron_tsdkd.engines.megatron.engine import OPTIMIZER_FORMAT

    model_sd = unwrap_model(model).sharded_state_dict()
    return {MODEL_KEY: model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_FORMAT),
            "trainer": {"step": 0}}


def measure(args) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.runtime import ParallelLayout, init_distributed
    from megatron_tsdkd.runtime.collectives import barrier, broadcast_object
    from megatron_tsdkd.engines.checkpoint import CheckpointWriter

    init_distributed(ParallelLayout())
    rank = dist.get_rank()
    model, optimizer = build_state(args)
    params = sum(p.numel() for p in model.parameters())
    root = broadcast_object(tempfile.mkdtemp(prefix="tsdkd_ckpt_bench_", dir=args.dir) if rank == 0 else None, 0)
    group = ps.get_data_parallel_group(with_context_parallel=True)
    writers = {"sync": CheckpointWriter(root, 1, False, group), "async": CheckpointWriter(root, 1, True, group)}
    times = {mode: {"blocking": [], "total": []} for mode in writers}
    step = 0
    try:
        for _ in range(args.repeats + 1):   # the first round warms up (plans, page cache, allocator)
            for mode, writer in writers.items():
                step += 1
                state = sharded_state(model, optimizer)
                barrier()
                start = time.perf_counter()
                writer.save(step, state)
                blocking = time.perf_counter() - start
                writer.finalize(blocking=True)
                total = time.perf_counter() - start
                if step > len(writers):
                    times[mode]["blocking"].append(blocking)
                    times[mode]["total"].append(total)
        last = os.path.join(root, f"step_{step:06d}")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(last) for f in files)
    finally:
        barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank != 0:
        return
    med = {mode: {k: statistics.median(v) for k, v in t.items()} for mode, t in times.items()}
    print(f"checkpoint save: {params / 1e6:.0f}M parameters per rank x {dist.get_world_size()} ranks (DP), fp32 "
          f"weights + distributed Adam, {size / 2**30:.2f} GiB on disk; median of {args.repeats}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for mode in writers:
        print(f"  {mode:5s}  blocking {med[mode]['blocking']:7.3f} s   total {med[mode]['total']:7.3f} s")
    print(f"  training blocked: sync / async = {med['sync']['blocking'] / med['async']['blocking']:.1f}x;  "
          f"async blocks {100 * med['async']['blocking'] / med['async']['total']:.0f}% of its own save;  "
          f"total async / sync = {med['async']['total'] / med['sync']['total']:.2f}x")


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    measure(args)


# --smoke (tests/test_benchmarks.py keeps the script alive): a one-layer model, one rank (no process spawned)
SMOKE = dict(hidden=64, layers=1, vocab=256, ranks=1, repeats=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn when not under torchrun (1: this "
                                                              "process, a world of one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) unless given")
    args = parser.parse_args(argv)
    if args.smoke:   # explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if "RANK" in os.environ or args.ranks == 1:
        measure(args)
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.ranks, port, args), nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
