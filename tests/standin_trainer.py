"""A stand-in for ``tsdkd-train`` that proves the launch path without the real trainer (a few seconds per job).

It takes the trainer's command line (``--config FILE key=value ...``; only ``checkpoint.dir``, ``schedule.max_steps``
and ``standin.step_seconds`` are read), joins torch.distributed (gloo) from torchrun's environment, checks the world
with an all-reduce, then "trains": one step per ``step_seconds``, each rank agreeing via an all-reduce whether any of
them got SIGUSR1/SIGTERM. On a signal it writes a "checkpoint" (the step) and exits 0, as the real trainer does;
with ``checkpoint.resume=auto`` semantics it starts from the saved step. Every run appends a JSON line to
``<checkpoint.dir>/runs.jsonl`` so a test can see the world size, the restart count and the steps of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    options = dict(item.split("=", 1) for item in args.overrides)
    ckpt_dir = options["checkpoint.dir"]
    max_steps = int(options.get("schedule.max_steps", "5"))
    step_seconds = float(options.get("standin.step_seconds", "0.2"))

    received = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ones = torch.ones(1)
    dist.all_reduce(ones)
    assert int(ones.item()) == world, f"all-reduce gave {ones.item()} on a world of {world}"

    os.makedirs(ckpt_dir, exist_ok=True)
    latest = os.path.join(ckpt_dir, "latest_step")
    step = int(open(latest).read()) if os.path.isfile(latest) else 0
    first = step
    stopped_by = None
    while step < max_steps:
        time.sleep(step_seconds)
        step += 1
        if rank == 0:
            print(f"standin: step {step}/{max_steps}", flush=True)
        flag = torch.tensor([float(received[0]) if received else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            stopped_by = signal.Signals(int(flag.item())).name
            break
    if rank == 0:
        with open(latest + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(latest + ".tmp", latest)
        record = {"world": world, "first_step": first, "last_step": step, "stopped_by": stopped_by,
                  "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "hosts": None}
        hosts = [None] * world
        dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME", socket.gethostname()))
        record["hosts"] = sorted(set(hosts))
        with open(os.path.join(ckpt_dir, "runs.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"standin: {'signal ' + stopped_by + ': saved' if stopped_by else 'finished'} at step {step}",
              flush=True)
    else:
        dist.all_gather_object([None] * world, os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
