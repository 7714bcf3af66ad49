"""Host memory of one node: what each rank holds in the node's memory, times the ranks the node runs, against the
memory the node has available.

Why: the device plan (memory_plan.py, zero_memory_plan.py) compares ONE rank with ONE GPU. Nothing compared the
ranks of a node with the node, so a 2-process fp32 CPU run (Qwen2.5-Coder 1.5B -> 0.5B with vLLM rollouts) was
killed by the kernel's out-of-memory killer after a start-up verdict of FITS against an 80 GiB GPU it did not have.

What a rank holds on the host, per rank (estimates from tensor sizes, as the device plan's):
- the Python process: torch, megatron-core, transformers (and vLLM) imported, allocator slack (``PROCESS_BYTES``,
  measured: 0.44 GiB imported, 0.73 GiB with vLLM, 0.86 GiB peak for the tiny demo-shaped run);
- loading: the largest tensor shard read from the checkpoint and assembled in the model's dtype (the loaders read
  one parameter at a time, models/hf_weights.py); with the DeepSpeed engine whatever it materialises before ZeRO
  partitions the models (``load_bytes``, from zero_memory_plan.py);
- on a GPU node with ``checkpoint.async_save``: this rank's checkpoint shard (weights and optimizer state), copied to
  host memory for the background writer;
- on a CPU run (no accelerator: tests, the demo, a laptop): everything the device plan counts (weights, gradients,
  optimizer state, activations, logits, KV cache; not its CUDA reserve), and a vLLM replica's weights at TP=1 plus
  its KV cache (sized as generation/vllm_replica.py sizes it on CPU) plus vLLM's own structures;
- with the DeepSpeed engine and ``deepspeed.offload_optimizer=cpu``: the rank's partition of the optimizer state.
The node's figure is ``ranks x per rank``; ``available`` is the memory the node has free for the job
(``memory.host_memory_gib``, else this machine's available memory when the job starts: the launcher's dry run and
every rank's start-up check run on the nodes themselves).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.hf_config import ArchSpec

GIB = 1024**3
PROCESS_BYTES = GIB                 # one training process with its libraries (see the module docstring)
VLLM_ENGINE_BYTES = GIB // 2        # a vLLM replica's own structures beside its weights and KV cache (CPU build)
VLLM_KV_SLACK = 16 << 20            # what generation/vllm_replica.py adds to its CPU KV cache
DEVICE_ONLY_ROWS = ("CUDA/NCCL runtime reserve", "vLLM replica")   # device-plan rows with no meaning on the host


@dataclass(frozen=True)
class HostPlan:
    ranks: int                          # ranks on the node
    rows: tuple[tuple[str, int], ...]   # (item, bytes) per rank
    available: int                      # bytes the node has for the job
    source: str                         # where ``available`` comes from
    on_host: bool                       # a CPU run: the models themselves live in host memory

    @property
    def per_rank(self) -> int:
        return sum(b for _, b in self.rows)

    @property
    def total(self) -> int:
        return self.ranks * self.per_rank

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def lines(self) -> list[str]:
        width = max(len(name) for name, _ in self.rows) + 4
        out = [f"host memory, per rank ({'a CPU run: the models live here' if self.on_host else 'beside the GPU'}), "
               f"GiB:"]
        out += [f"  {name:<{width}}{b / GIB:>10.2f}" for name, b in self.rows]
        out.append(f"  {'per rank':<{width}}{self.per_rank / GIB:>10.2f}")
        out.append(f"  {f'x {self.ranks} ranks on the node':<{width}}{self.total / GIB:>10.2f}")
        out.append(f"  {'available (' + self.source + ')':<{width}}{self.available / GIB:>10.2f}")
        out.append(self.verdict())
        return out

    def verdict(self) -> str:
        figure = (f"{self.ranks} ranks x {self.per_rank / GIB:.1f} GiB = {self.total / GIB:.1f} GiB of "
                  f"{self.available / GIB:.1f} GiB available ({self.source})")
        if self.fits:
            return f"host verdict: FITS, {figure}"
        name, largest = max(self.rows, key=lambda row: row[1])
        return f"host verdict: DOES NOT FIT, {figure}; largest item per rank: {name} ({largest / GIB:.1f} GiB)"

    def advice(self, dtype: str, vllm: bool, engine: str) -> str:
        """What to change, for the one-line refusal."""
        ways = []
        if dtype == "fp32":
            ways.append("precision.dtype=bf16 (halves weights, activations and logits)")
        if vllm and self.on_host:
            ways.append("rollout.engine=megatron (no second copy of the student)")
        if engine == "deepspeed" and not self.on_host:
            ways.append("deepspeed.zero_stage=3 (loads partitioned)")
        ways.append(f"fewer processes per node (now {self.ranks})")
        ways.append("memory.host_memory_gib=N if the node has more for this job")
        return "; ".join(ways)


@dataclass(frozen=True)
class NodeFacts:
    """What the host plan needs to know about the node a job runs on."""
    ranks: int             # processes on the node
    available: int         # bytes it has for them
    source: str            # where ``available`` comes from
    on_host: bool          # no accelerator: the models live in host memory


def host_plan(device_rows, node: NodeFacts, *, student: ArchSpec, student_parameters: int, dtype: str,
              padded_vocab: int, tp: int, vllm: bool, rollout_rows: int, rollout_len: int, async_save: bool,
              load_bytes: Optional[int] = None, offloaded_bytes: int = 0) -> HostPlan:
    """The plan of one node. ``device_rows``: the device plan's rows (memory_plan.Row: name, bytes_per_stage,
    phase) for the worst stage's figures; ``load_bytes``: an engine's own loading peak per rank (DeepSpeed), else
    the megatron loaders' (the largest vocabulary shard, read and assembled); ``rollout_rows``/``rollout_len``:
    the sequences one rank samples at once and their length (a vLLM replica's KV cache on CPU);
    ``offloaded_bytes``: optimizer state an engine keeps in host memory (ZeRO-Offload)."""
    elem = DTYPES[dtype].itemsize
    rows = [("Python process and libraries", PROCESS_BYTES)]
    shard = padded_vocab // tp * student.hidden_size
    rows.append(("loading (largest tensor read and assembled)" if load_bytes is None else "loading (engine)",
                 load_bytes if load_bytes is not None else shard * (4 + elem)))
    host_rows = [r for r in device_rows if not r.name.startswith(DEVICE_ONLY_ROWS)]
    stages = len(device_rows[0].bytes_per_stage) if device_rows else 1
    if node.on_host:
        worst = max(range(stages), key=lambda s: _peak(host_rows, s))
        rows.append(("the device plan, held on the host (no CUDA reserve)", _peak(host_rows, worst)))
        if vllm:
            weights = student_parameters * elem
            kv = (2 * student.num_layers * student.num_query_groups * student.head_dim * elem * rollout_len
                  * rollout_rows + VLLM_KV_SLACK)
            rows.append(("vLLM replica: weights (TP=1) + KV cache + engine", weights + kv + VLLM_ENGINE_BYTES))
    elif async_save:
        state = [r for r in host_rows if r.name.startswith(("student weights", "optimizer state"))]
        staged = max(sum(r.bytes_per_stage[s] for r in state) for s in range(stages)) if state else 0
        rows.append(("async checkpoint staging (checkpoint.async_save)", staged))
    if offloaded_bytes:   # not in the device plan, on either kind of node
        rows.append(("optimizer state offloaded to the host (deepspeed.offload_optimizer)", offloaded_bytes))
    return HostPlan(node.ranks, tuple(rows), node.available, node.source, node.on_host)


def _peak(rows, stage: int) -> int:
    total = {"static": 0, "train": 0, "rollout": 0}
    for r in rows:
        total[r.phase] += r.bytes_per_stage[stage]
    return total["static"] + max(total["train"], total["rollout"])


def node_facts(ranks: int, on_host: bool, host_memory_gib: Optional[float] = None) -> NodeFacts:
    """The node this process runs on: ``host_memory_gib`` if the user set it (memory.host_memory_gib), else the
    memory available for new allocations now (psutil; Linux: MemAvailable, free plus reclaimable)."""
    if host_memory_gib:
        return NodeFacts(ranks, int(host_memory_gib * GIB), "memory.host_memory_gib", on_host)
    import psutil

    return NodeFacts(ranks, int(psutil.virtual_memory().available), "this node, now", on_host)
