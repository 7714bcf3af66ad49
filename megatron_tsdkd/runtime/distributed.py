"""Process groups from the launcher's environment: torch.distributed plus megatron-core's parallel_state.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under Slurm without torchrun we read
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the first node of SLURM_JOB_NODELIST. A single process with no
launcher runs as a world of one. NCCL on GPU, gloo on CPU (where the CPU shim is applied first).
"""
from __future__ import annotations

import datetime
import gc
import os
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.runtime import cpu_shim, rank_deaths


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1   # a MoE model's experts over this many data-parallel ranks (each split over tensor)

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
    """Initialise torch.distributed (once) and megatron parallel_state, then seed megatron's RNG tracker.

    megatron's groups are rebuilt only when the layout differs from the one this function last built (or when
    something else re-initialised parallel_state since); the groups they replace are destroyed, not just dropped.
    The seeding runs on every call, so a repeated call leaves the same RNG state as a fresh initialisation.
    """
    global _built
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_shim.apply()
    if not dist.is_initialized():
        os.environ.update(env_from_launcher())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")   # a world of one without a launcher (DeepSpeed asserts on it)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
        )
        rank_deaths.remember_peers()   # so that a rank that dies is named by its peers (collective)
    layout.data_parallel(dist.get_world_size())  # validates divisibility with a clear message
    key = (layout, dist.get_world_size(), dist.group.WORLD)
    if not (_built is not None and _built[0] == key and _state_unchanged(parallel_state, _built[1])):
        _teardown_model_parallel(parallel_state)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            context_parallel_size=layout.context,
            expert_model_parallel_size=layout.expert,
            expert_tensor_parallel_size=layout.tensor,
        )
        _built = (key, _state_snapshot(parallel_state))
    model_parallel_cuda_manual_seed(seed)


# (layout key, snapshot of parallel_state's globals) as init_distributed last left them; None when not built.
_built: Optional[tuple] = None
# (tensor, pipeline) -> the ProcessGroupCollection of a model laid out on groups of its own; built once per
# parallel_state (they share its context-parallel group) and destroyed with it
_model_groups: dict = {}


def model_process_groups(tensor: int, pipeline: int, expert: Optional[int] = None):
    """megatron-core's process groups (a ProcessGroupCollection) for a model laid out tensor x pipeline over the
    whole world, beside parallel_state's (a teacher with its own layout). Ranks: tensor fastest, then pipeline,
    then data (megatron-core's HyperCommGrid); the embedding group joins each pipeline's first and last stage (tied
    embeddings); context parallelism is parallel_state's (size 1). A MoE model (``expert`` set; None: a dense
    model, no expert groups) has its experts split over ``expert`` neighbouring data-parallel replicas (ep: the data dimension's fastest part; expt_dp the rest) and each expert
    over the model's tensor group (expt_tp = tp), as megatron-core lays experts out by default. Collective on first
    use for a layout (every rank calls it in the same order); cached until parallel_state's groups are rebuilt,
    and destroyed with them."""
    from megatron.core import parallel_state
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    key = (tensor, pipeline, expert)
    if key not in _model_groups:
        dp = dist.get_world_size() // (tensor * pipeline)
        ep = expert or 1
        grid = HyperCommGrid([tensor, pipeline, ep, dp // ep], ["tp", "pp", "ep", "edp"])
        groups = ProcessGroupCollection(tp=grid.create_pg("tp"), pp=grid.create_pg("pp"),
                                        mp=grid.create_pg(["tp", "pp"]), dp=grid.create_pg(["ep", "edp"]),
                                        cp=parallel_state.get_context_parallel_group())
        groups.dp_cp = groups.dp
        made = [groups.tp, groups.pp, groups.mp, groups.dp]
        if expert is not None:
            groups.ep, groups.expt_dp = grid.create_pg("ep"), grid.create_pg("edp")
            groups.tp_ep, groups.tp_dp_cp = grid.create_pg(["tp", "ep"]), grid.create_pg(["tp", "ep", "edp"])
            groups.expt_tp, groups.tp_cp = groups.tp, groups.tp   # context parallelism is 1
            made += [groups.ep, groups.expt_dp, groups.tp_ep, groups.tp_dp_cp]
        pipelines = grid.get_rank_enum("pp")
        groups.embd, embd = dist.new_subgroups_by_enumeration([sorted({p[0], p[-1]}) for p in pipelines])
        groups.pos_embd, pos_embd = dist.new_subgroups_by_enumeration([[p[0]] for p in pipelines])
        # every group made, this rank's or not, so that teardown destroys them all
        _model_groups[key] = (groups, made + [*embd, *pos_embd])
    return _model_groups[key][0]


def _state_snapshot(parallel_state) -> dict:
    """parallel_state's module globals (groups, ranks, sizes, overrides), to tell whether anyone changed them."""
    return {name: value for name, value in vars(parallel_state).items()
            if name.startswith("_") and not name.startswith("__") and not callable(value)
            and not isinstance(value, type(parallel_state))}


def _state_unchanged(parallel_state, snapshot: dict) -> bool:
    current = _state_snapshot(parallel_state)
    return current.keys() == snapshot.keys() and all(current[k] is v for k, v in snapshot.items())


def _megatron_process_groups(parallel_state) -> list:
    """Every torch ProcessGroup held by megatron's parallel_state (its module globals, including lists and dicts
    of groups), once each, without the default WORLD group."""
    found: dict[int, object] = {}

    def visit(value, depth: int = 0) -> None:
        if isinstance(value, dist.ProcessGroup):
            found.setdefault(id(value), value)
        elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                visit(item, depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    for name, value in vars(parallel_state).items():
        if name.startswith("_") and not name.startswith("__"):
            visit(value)
    world = dist.group.WORLD if dist.is_initialized() else None
    return [group for group in found.values() if group is not world]


def _teardown_model_parallel(parallel_state) -> None:
    """Destroy every process group megatron created (and those of models on groups of their own), then reset
    parallel_state.

    megatron-core's destroy_model_parallel only drops its references (except for a few gloo groups), which leaves
    each group's communicator, and with gloo its ``gloo_tcp_loop`` threads, alive for the rest of the process.
    """
    global _built
    _built = None
    destroyed = 0
    _forget_moe_tracker()
    if dist.is_initialized():
        world = dist.distributed_c10d._world
        ours = [group for _, made in _model_groups.values() for group in made if isinstance(group, dist.ProcessGroup)]
        live = [group for group in {id(g): g for g in [*_megatron_process_groups(parallel_state), *ours]}.values()
                if group in world.pg_map and group is not dist.group.WORLD]
        # In the order torch itself shuts groups down (NCCL's abort was collective in some versions).
        for group in sorted(live, key=lambda g: world.pg_names.get(g, ""), reverse=True):
            dist.destroy_process_group(group)
            destroyed += 1
    _model_groups.clear()
    parallel_state.destroy_model_parallel()
    if destroyed:
        # A destroyed group's threads end with its C++ object, and torch's Python wrappers sit in reference cycles:
        # collect now, or each re-initialisation adds its threads until the collector happens to run.
        gc.collect()


def _forget_moe_tracker() -> None:
    """megatron-core's MoE loss tracker (a module global) keeps the process groups its routers reduce over
    (moe_utils.py save_to_aux_losses_tracker): a reference that would keep each destroyed group's threads alive."""
    import sys

    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy() -> None:
    """Destroy megatron's process groups and then torch.distributed's default group."""
    from megatron.core import parallel_state

    _teardown_model_parallel(parallel_state)
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
