"""Process groups from the launcher's environment: torch.distributed plus megatron-core's parallel_state.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under Slurm without torchrun we read
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the first node of SLURM_JOB_NODELIST. A single process with no
launcher runs as a world of one. NCCL on GPU, gloo on CPU (where the CPU shim is applied first).
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tsdkd.runtime import cpu_shim


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1

    def data_parallel(self, world_size: int) -> int:
        model_parallel = self.tensor * self.pipeline * self.context
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor({self.tensor}) x pipeline({self.pipeline})"
                f" x context({self.context}) = {model_parallel}"
            )
        return world_size // model_parallel


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def env_from_launcher() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as torch.distributed expects, filled from Slurm when torchrun is absent."""
    env = {}
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        env["RANK"] = os.environ["SLURM_PROCID"]
        env["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or _first_slurm_host(os.environ["SLURM_JOB_NODELIST"])
        env["MASTER_PORT"] = os.environ.get("MASTER_PORT", "29500")
    return env


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(layout: ParallelLayout = ParallelLayout(), seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed (once) and megatron parallel_state (re-initialised if the layout changes)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_shim.apply()
    if not dist.is_initialized():
        os.environ.update(env_from_launcher())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    layout.data_parallel(dist.get_world_size())  # validates divisibility with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
    )
    model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
