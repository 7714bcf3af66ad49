"""Collectives on the project's own data are device-true (runtime/collectives.py), and phase timing adds no host
sync inside the step (runtime/timing.py).

Every test runs on CPU: NCCL/CUDA is simulated by monkeypatching ``dist.get_backend`` and ``torch.cuda``; the
reductions also run for real on two gloo processes.
"""
from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import megatron_tsdkd
from harness import run_parallel

PACKAGE = Path(megatron_tsdkd.__file__).parent
HOME = PACKAGE / "runtime" / "collectives.py"   # the one file allowed to turn Python values into collective tensors

# ---------------------------------------------------------------------------------------------------------------
# (a) a check over the package's source

COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend", "irecv", "all_to_all",
    "all_to_all_single", "_all_gather_base", "_reduce_scatter_base",
}
# torch factories that allocate a new tensor (on the CPU unless told otherwise); *_like inherit their source's device
FACTORIES = {
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "from_numpy", "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor",
    "BFloat16Tensor", "LongTensor", "IntTensor", "ShortTensor", "ByteTensor", "BoolTensor",
}
FROM_PYTHON = {"tensor", "as_tensor", "from_numpy"} | {f for f in FACTORIES if f.endswith("Tensor")}
# methods that keep a tensor where it is (so a CPU tensor stays a CPU tensor)
SAME_DEVICE = {
    "float", "double", "half", "bfloat16", "long", "int", "bool", "contiguous", "view", "reshape", "clone",
    "detach", "flatten", "unsqueeze", "squeeze", "expand", "t", "mul", "div", "add", "sub",
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module path, from every import in the file (function-local ones too)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _qualname(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _scope_nodes(scope: ast.AST):
    """The nodes of a scope; a function's own scope includes its nested functions (closures see its names)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(scope, ast.Module) and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


class _Scope:
    def __init__(self, aliases: dict[str, str], is_home: bool):
        self.aliases, self.is_home = aliases, is_home
        self.tainted: dict[str, str] = {}

    def problem(self, expr: ast.AST) -> str | None:
        """Why ``expr``, handed to a collective, may be on the wrong device (None: nothing found)."""
        if isinstance(expr, ast.Name):
            return self.tainted.get(expr.id)
        if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            return next((p for p in map(self.problem, expr.elts) if p), None)
        if isinstance(expr, (ast.ListComp, ast.GeneratorExp)):
            return self.problem(expr.elt)
        if isinstance(expr, ast.BinOp):
            return self.problem(expr.left) or self.problem(expr.right)
        if isinstance(expr, ast.Starred):
            return self.problem(expr.value)
        if isinstance(expr, ast.Call):
            name = _qualname(expr.func, self.aliases)
            if name and name.startswith("torch.") and name.count(".") == 1 and name[6:] in FACTORIES:
                factory = name[6:]
                if not any(k.arg == "device" for k in expr.keywords):
                    return f"torch.{factory}(...) without device="
                if factory in FROM_PYTHON and not self.is_home:
                    return f"torch.{factory}(...) of Python values outside runtime/collectives.py"
                return None
            if isinstance(expr.func, ast.Attribute):
                method = expr.func.attr
                if method == "cpu" or (method == "to" and any(
                        isinstance(a, ast.Constant) and a.value == "cpu" for a in expr.args)):
                    return "a tensor moved to the CPU"
                if method in SAME_DEVICE:
                    return self.problem(expr.func.value)
        return None


def device_problems(source: str, path: str = "<string>", is_home: bool = False) -> list[str]:
    """``path:line: reason`` for each collective in ``source`` handed a tensor that may be on the wrong device."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = set()
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in scopes:
        scope = _Scope(aliases, is_home)
        nodes = list(_scope_nodes(node))
        for _ in range(3):  # names built from names: iterate to a fixed point (flow-insensitive, conservative)
            for n in nodes:
                targets, value = [], None
                if isinstance(n, ast.Assign):
                    targets, value = n.targets, n.value
                elif isinstance(n, (ast.AnnAssign, ast.AugAssign)) and n.value is not None:
                    targets, value = [n.target], n.value
                reason = scope.problem(value) if value is not None else None
                for t in targets:
                    if isinstance(t, ast.Name) and reason:
                        scope.tainted.setdefault(t.id, reason)
        for n in nodes:
            if not isinstance(n, ast.Call):
                continue
            name = _qualname(n.func, aliases) or ""
            if not (name.startswith("torch.distributed.") and name.rsplit(".", 1)[1] in COLLECTIVES):
                continue
            for arg in [*n.args, *(k.value for k in n.keywords)]:
                reason = scope.problem(arg)
                if reason:
                    found.add(f"{path}:{n.lineno}: {name.rsplit('.', 1)[1]} gets {reason}")
    return sorted(found)


def test_source_check_catches_cpu_tensors_in_collectives():
    bad = '''
import torch
import torch.distributed as dist
from torch.distributed import all_reduce

def metrics(values, group):
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=group)

def flag(received):
    f = torch.tensor([1.0 if received else 0.0])
    g = f.float()
    all_reduce(g, op=dist.ReduceOp.MAX)

def inline(group):
    torch.distributed.broadcast(torch.zeros(3), src=0, group=group)

def gathered(x, group):
    parts = [torch.empty(3) for _ in range(2)]
    dist.all_gather(parts, x, group=group)

def moved(x):
    dist.all_reduce(x.cpu())

def python_values_with_a_device(device):
    counts = torch.tensor([1, 2], device=device)
    dist.all_reduce(counts)
'''
    problems = device_problems(bad)
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [8, 13, 16, 20, 23, 27], problems
    # the home of collectives may build tensors from Python values, with a device
    assert [p for p in device_problems(bad, is_home=True) if ":27:" in p] == []

    good = '''
import torch
import torch.distributed as dist

def model_data(logits, group, device):
    total = logits.float().sum(dim=-1)
    dist.all_reduce(total, group=group)
    buf = torch.empty(3, device=device)
    dist.recv(buf, src=0)
    shards = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(shards, logits.contiguous(), group=group)

def other(values):
    t = torch.tensor(values)      # never handed to a collective
    return t.sum()
'''
    assert device_problems(good) == []


def test_package_hands_collectives_no_cpu_tensors():
    """No module of megatron_tsdkd hands a collective a tensor built without a device, and none but
    runtime/collectives.py turns Python values into a collective's tensor (NCCL takes CUDA tensors only)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += device_problems(path.read_text(), str(path.relative_to(PACKAGE.parent)), is_home=path == HOME)
    assert problems == [], "use megatron_tsdkd.runtime.collectives:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# (b) the module, with NCCL/CUDA simulated: which device each collective's tensor is asked for

class _RecordDevices(torch.overrides.TorchFunctionMode):
    """Records the device every factory / ``.to`` call asks for and builds the tensor on the CPU instead (this
    machine has no GPU), as the CPU shim does."""

    def __init__(self):
        super().__init__()
        self.requested: list[torch.device] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and kwargs["device"] is not None:
            self.requested.append(torch.device(kwargs["device"]))
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@pytest.fixture
def fake_nccl(monkeypatch):
    """A rank with LOCAL_RANK=2 on a 4-GPU node whose process group is NCCL, before torch.cuda.set_device ran;
    the collectives record what they were given (and the current GPU at that moment) instead of communicating."""
    from megatron_tsdkd.runtime import collectives

    state = {"current": 0, "set_device": [], "calls": []}
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])

    def set_device(index):
        state["set_device"].append(index)
        state["current"] = int(index)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)

    def recorder(name):
        def collective(*args, **kwargs):
            state["calls"].append((name, state["current"], args, kwargs))
            if name == "all_reduce":
                args[0].mul_(2)          # as if the other rank held the same values
            elif name == "all_gather_object":
                args[0][:] = [args[1]] * len(args[0])
            elif name == "gather_object" and args[1] is not None:
                args[1][:] = [args[0]] * len(args[1])
        return collective

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather_object", "gather_object", "barrier"):
        monkeypatch.setattr(dist, name, recorder(name))
    assert collectives.dist is dist
    return state


def test_group_device_follows_the_backend(fake_nccl, monkeypatch):
    from megatron_tsdkd.runtime.collectives import group_device

    assert group_device("dp") == torch.device("cuda", 2)
    assert fake_nccl["set_device"] == [2]           # bound to LOCAL_RANK's GPU, once
    assert group_device("dp") == torch.device("cuda", 2) and fake_nccl["set_device"] == [2]
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert group_device("dp") == torch.device("cpu")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert group_device() == torch.device("cpu")


def test_a_process_already_bound_to_its_gpu_is_left_alone(fake_nccl):
    from megatron_tsdkd.runtime.collectives import group_device

    fake_nccl["current"] = 3    # e.g. CUDA_VISIBLE_DEVICES or an explicit set_device elsewhere
    assert group_device() == torch.device("cuda", 3) and fake_nccl["set_device"] == []


def test_reductions_allocate_on_the_nccl_device(fake_nccl):
    from megatron_tsdkd.runtime.collectives import all_reduce_values, any_true, sum_counts

    mode = _RecordDevices()
    with mode:
        values = all_reduce_values([1.5, 2.5], group="dp")
        source = torch.tensor([1.0, 4.0])
        from_tensor = all_reduce_values(source, op=dist.ReduceOp.MAX, group="dp")
        flag = any_true(True, group="dp")
        counts = sum_counts([3, 7], group="dp")
    assert mode.requested[0] == torch.device("cuda", 2)
    assert mode.requested[1:] == [torch.device("cuda", 2)] * 3
    assert values.dtype == torch.float64 and values.tolist() == [3.0, 5.0]
    assert from_tensor.tolist() == [2.0, 8.0] and source.tolist() == [1.0, 4.0]   # the input is left unchanged
    assert flag is True and counts == [6, 14]
    ops = [(c[0], c[3].get("op"), c[3].get("group")) for c in fake_nccl["calls"]]
    assert ops == [("all_reduce", dist.ReduceOp.SUM, "dp"), ("all_reduce", dist.ReduceOp.MAX, "dp"),
                   ("all_reduce", dist.ReduceOp.MAX, "dp"), ("all_reduce", dist.ReduceOp.SUM, "dp")]
    assert fake_nccl["calls"][3][2][0].dtype == torch.int64


def test_packed_metrics_go_over_nccl_as_one_cuda_tensor(fake_nccl):
    """Numbers and device scalars in one tensor on the NCCL device: one all-reduce, one tensor broadcast."""
    from megatron_tsdkd.runtime.collectives import all_reduce_values, broadcast_values

    mode = _RecordDevices()
    with mode:
        reduced = all_reduce_values([0.5, torch.tensor(2.0), torch.tensor(3, dtype=torch.int32), 4.0], group="dp")
        sent = broadcast_values(reduced, 4, src=0, group="pp")        # this rank (0) is the source
    assert set(mode.requested) == {torch.device("cuda", 2)}
    assert reduced.dtype == torch.float64 and reduced.tolist() == [1.0, 4.0, 6.0, 8.0] == sent.tolist()
    assert [(c[0], c[3].get("group")) for c in fake_nccl["calls"]] == [("all_reduce", "dp"), ("broadcast", "pp")]
    with _RecordDevices(), pytest.raises(ValueError, match="3 values from rank 0, but 4 announced"):
        broadcast_values([1.0, 2.0, 3.0], 4, src=0, group="pp")


def test_object_collectives_bind_the_gpu_first(fake_nccl):
    from megatron_tsdkd.runtime.collectives import all_gather_objects, barrier, broadcast_object, gather_objects

    assert broadcast_object({"a": 1}, src=1, group="pp") == {"a": 1}
    assert fake_nccl["set_device"] == [2]
    assert all_gather_objects("x") == ["x", "x"]
    assert gather_objects("y", dst=0) == ["y", "y"]
    barrier()
    assert [(name, gpu) for name, gpu, _, _ in fake_nccl["calls"]] == [
        ("broadcast_object_list", 2), ("all_gather_object", 2), ("gather_object", 2), ("barrier", 2)]


def test_world_of_one_needs_no_process_group(monkeypatch):
    from megatron_tsdkd.runtime import collectives as c

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert c.all_reduce_values([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert c.any_true(False) is False and c.any_true(True) is True
    assert c.sum_counts([2, 5]) == [2, 5]
    assert c.broadcast_object("o", src=0) == "o" and c.all_gather_objects(1) == [1] and c.gather_objects(1) == [1]
    c.barrier()


# real gloo runs on two processes

def _collectives_on_gloo():
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.runtime import collectives as c
    from megatron_tsdkd.engines.metrics import reduce_to_rank0
    from megatron_tsdkd.engines.preemption import PreemptionFlag

    rank, dp = dist.get_rank(), ps.get_data_parallel_group()
    flag = PreemptionFlag()
    before = flag.any_rank_received()
    if rank == 1:
        flag.received = 15
    after = flag.any_rank_received()
    flag.restore()
    return dict(
        device=str(c.group_device(dp)),
        sums=c.all_reduce_values([rank + 0.5, 2.0 * rank], group=dp).tolist(),
        maxima=c.all_reduce_values(torch.tensor([rank, -rank]), op=dist.ReduceOp.MAX, dtype=torch.int64).tolist(),
        any_rank1=c.any_true(rank == 1, group=dp), any_none=c.any_true(False),
        counts=c.sum_counts([rank, 1], group=dp),
        broadcast=c.broadcast_object({"from": rank}, src=1),
        gathered_all=c.all_gather_objects(rank * 10),
        gathered=c.gather_objects(("r", rank), dst=0),
        barrier=c.barrier(),
        preemption=(before, after),
        metrics=reduce_to_rank0({"loss": float(rank), "lr": 0.1}),
    )


def test_collectives_on_two_gloo_processes():
    out = run_parallel(_collectives_on_gloo, world_size=2)
    for rank, o in enumerate(out):
        assert o["device"] == "cpu"
        assert o["sums"] == [2.0, 2.0] and o["maxima"] == [1, 0]
        assert o["any_rank1"] is True and o["any_none"] is False
        assert o["counts"] == [1, 2] and o["broadcast"] == {"from": 1} and o["gathered_all"] == [0, 10]
        assert o["gathered"] == ([("r", 0), ("r", 1)] if rank == 0 else None)
        assert o["preemption"] == (False, True)
    assert out[0]["metrics"] == {"loss": 0.5, "lr": 0.1} and out[1]["metrics"] is None


def _metrics_from_the_last_stage():
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.engines.metrics import reduce_to_rank0

    return reduce_to_rank0({"loss": 3.0} if ps.is_pipeline_last_stage() else None, names=["loss"])


def test_metrics_travel_from_the_last_pipeline_stage_to_rank0():
    assert run_parallel(_metrics_from_the_last_stage, world_size=2, pp=2) == [{"loss": 3.0}, None]


# ---------------------------------------------------------------------------------------------------------------
# phase timing: the wall clock on CPU, CUDA events (read once, at pop) on GPU

def _work(n: int) -> None:
    x = torch.full((128, 128), 0.01)
    for _ in range(n):
        x = torch.tanh(x @ x + 0.01)


def test_clock_measures_a_cpu_workload_consistently():
    from megatron_tsdkd.runtime.timing import PhaseClock

    assert not torch.cuda.is_available()
    clock = PhaseClock()
    _work(50)  # warm-up
    singles, doubles = [], []
    for _ in range(5):
        begin = time.perf_counter()
        with clock.phase("one"):
            _work(100)
        outside = time.perf_counter() - begin
        with clock.phase("two"):
            _work(200)
        with clock.phase("two_halves"):
            _work(100)
        with clock.phase("two_halves"):
            _work(100)
        phases = dict(clock.pop())
        assert set(phases) == {"one", "two", "two_halves"}
        assert 0.0 < phases["one"] <= outside
        singles.append(phases["one"])
        doubles.append((phases["two"], phases["two_halves"]))
    one = min(singles)
    two, halves = min(d[0] for d in doubles), min(d[1] for d in doubles)
    assert 1.3 < two / one < 3.0 and 0.6 < halves / two < 1.6, (one, two, halves)
    assert clock.pop() == {}


class _FakeEvent:
    """Stands in for torch.cuda.Event: a record takes the simulated GPU clock's time, which is known only once
    the event was waited for (elapsed_time before that raises, as CUDA does for an unfinished event)."""
    now_ms = 0.0
    waits = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None
        self.done = False

    def record(self, stream=None):
        self.at = _FakeEvent.now_ms

    def synchronize(self):
        _FakeEvent.waits += 1
        self.done = True

    def elapsed_time(self, end):
        if not end.done:
            raise RuntimeError("event not completed")
        return end.at - self.at


class _FakeModel(torch.nn.Module):
    def __init__(self, hidden, gpu_ms):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden})()
        self.post_process = True
        self.gpu_ms = gpu_ms

    def set_input_tensor(self, tensor):
        pass

    def forward(self, input_ids, position_ids, attention_mask):
        _FakeEvent.now_ms += self.gpu_ms     # the kernels this forward would queue
        return torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)


def test_stage_forward_records_cuda_events_and_syncs_only_at_pop(monkeypatch):
    from megatron_tsdkd.runtime import cpu_shim
    from megatron_tsdkd.engines.megatron.colocation import CoLocatedStage

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_shim, "is_applied", lambda: False)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(1))
    monkeypatch.setattr(_FakeEvent, "now_ms", 0.0)
    monkeypatch.setattr(_FakeEvent, "waits", 0)
    stage = CoLocatedStage(_FakeModel(4, gpu_ms=3.0), _FakeModel(6, gpu_ms=5.0))
    tokens = torch.zeros(2, 5, dtype=torch.long)
    for _ in range(3):   # three micro-batches of one step
        student_logits, teacher_logits = stage(tokens, tokens, None)
        assert student_logits.shape == teacher_logits.shape == (2, 5, 8)
    assert syncs == [] and _FakeEvent.waits == 0      # nothing waited inside the step
    phases = stage.clock.pop()
    assert syncs == [] and _FakeEvent.waits == 0      # nor when popped: only when the times are read
    assert phases.get("teacher_forward") == pytest.approx(0.015)
    assert syncs == [] and 0 < _FakeEvent.waits <= 6  # the waits happen there, at one point
    waits = _FakeEvent.waits
    assert dict(phases) == pytest.approx({"teacher_forward": 0.015, "student_forward": 0.009})
    assert _FakeEvent.waits == waits                  # read once
    assert stage.clock.pop() == {} and _FakeEvent.waits == waits   # nothing pending: no wait at all

    # a step whose times nobody reads (not a logging step, or the pop before the schedule) never waits
    stage(tokens, tokens, None)
    stage.clock.pop()
    assert syncs == [] and _FakeEvent.waits == waits
    stage(tokens, tokens, None)
    assert dict(stage.clock.pop()) == pytest.approx({"teacher_forward": 0.005, "student_forward": 0.003})


def test_the_shims_null_event_is_never_used_for_timing(monkeypatch):
    """With the CPU shim applied torch.cuda.Event measures nothing: the clock must read the wall clock."""
    from megatron_tsdkd.runtime import cpu_shim
    from megatron_tsdkd.runtime.timing import PhaseClock

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # even if something claims CUDA
    monkeypatch.setattr(cpu_shim, "is_applied", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", cpu_shim._NullEvent)
    clock = PhaseClock()
    with clock.phase("work"):
        _work(40)
    assert clock.pop()["work"] > 0.0
