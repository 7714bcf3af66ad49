"""The test harness destroys what it creates: re-initialising megatron's groups does not pile up gloo threads,
and no worker process, nor anything a worker started, outlives its pool or the test process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from harness import WorkerPool, alive, run_parallel

LAYOUT_CHANGES = 16          # each leaked layout would add ~50 threads per change; 12 changes after the warm-up show it
WARM_UP = 4                 # calls before the baseline (both layouts built once, lazily started threads running)
THREAD_SLACK = 8            # allowed growth over the baseline; one leaked TP=2 layout costs ~50 threads here
EXIT_WAIT_S = 30.0 * float(os.environ.get("TSDKD_TEST_TIME_FACTOR", "1"))


def _os_threads() -> dict:
    """This worker's OS threads (gloo's are invisible to ``threading``) and torch's live process groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return dict(threads=len(os.listdir("/proc/self/task")), groups=len(dist.distributed_c10d._world.pg_map),
                tp=ps.get_tensor_model_parallel_world_size())


def test_layout_changes_do_not_accumulate_threads():
    counts = []
    for i in range(LAYOUT_CHANGES):
        tp = 2 if i % 2 == 0 else 1
        out = run_parallel(_os_threads, world_size=2, tp=tp)
        assert [o["tp"] for o in out] == [tp, tp], "the layout was not rebuilt"
        counts.append(out)
    for _ in range(3):   # an unchanged layout reuses its groups: nothing new either
        counts.append(run_parallel(_os_threads, world_size=2, tp=1))
    threads = [[o["threads"] for o in out] for out in counts]
    groups = [[o["groups"] for o in out] for out in counts]
    print(f"\nworker OS threads over {len(counts)} calls ({LAYOUT_CHANGES} layout changes):"
          f" first {threads[0]}, after warm-up {threads[WARM_UP]}, peak {[max(c) for c in zip(*threads)]},"
          f" last {threads[-1]}; live process groups first {groups[0]}, last {groups[-1]}")
    for rank in range(2):
        baseline = max(t[rank] for t in threads[:WARM_UP + 1])
        peak = max(t[rank] for t in threads[WARM_UP:])
        assert peak <= baseline + THREAD_SLACK, f"rank {rank}: threads grew from {baseline} to {peak}: {threads}"
        for tp in (1, 2):
            live = {out[rank]["groups"] for out in counts[WARM_UP:] if out[rank]["tp"] == tp}
            assert len(live) == 1, f"rank {rank}: process groups pile up at TP={tp}: {groups}"


# ---------------------------------------------------------------------------------------------------------------
# Process lifetimes. The rank function stands in for dist_checkpointing: a non-daemonic multiprocessing child
# (which itself starts a process) plus a plain subprocess.

def _helper(pid_pipe) -> None:
    grandchild = subprocess.Popen(["sleep", "3600"])
    pid_pipe.send(grandchild.pid)
    time.sleep(3600)


def _start_children(pid_file: str | None = None) -> list[int]:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    helper = ctx.Process(target=_helper, args=(send,))
    helper.start()
    pids = [helper.pid, receive.recv(), subprocess.Popen(["sleep", "3600"]).pid]
    if pid_file is not None:   # then hang, as a rank stuck in a collective would
        with open(pid_file, "w") as f:
            json.dump(pids, f)
        time.sleep(3600)
    return pids


def _wait_all_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _own_tree(pool: WorkerPool) -> list[int]:
    return [pid for pid, _ in pool.pids()]


def _hang(pool: WorkerPool, pid_file: str) -> list[int]:
    """Make ``pool``'s worker start children and then hang in its task; the children's pids."""
    pool.run(_os_threads, (), {}, (1, 1, 1), 0, 600)   # up and running before the short timeout below
    with pytest.raises(TimeoutError):
        pool.run(_start_children, (pid_file,), {}, (1, 1, 1), 0, 3.0)
    with open(pid_file) as f:
        return json.load(f)


def test_close_ends_workers_and_their_children(tmp_path):
    """A pool closed while idle (each worker ends its children), one whose worker hangs in a task (killed with its
    process tree after the grace period), and a hanging worker sent SIGTERM (it ends its children on the way out)."""
    idle, stuck, terminated = WorkerPool(1), WorkerPool(1), WorkerPool(1)   # started together: imports overlap
    pools = {"idle": idle, "stuck": stuck, "terminated": terminated}
    trees = {}
    try:
        children = {"idle": idle.run(_start_children, (), {}, (1, 1, 1), 0, 600)[0]}
        for name in ("stuck", "terminated"):
            children[name] = _hang(pools[name], str(tmp_path / f"{name}.json"))
        for name, pool in pools.items():
            trees[name] = _own_tree(pool)
            assert len(trees[name]) == 4 and set(children[name]) <= set(trees[name]), (name, trees[name])
            assert all(alive(p) for p in trees[name])
        idle.close()
        stuck.close(grace=1.0)
        os.kill(terminated.procs[0].pid, signal.SIGTERM)
        left = {name: _wait_all_gone(tree, EXIT_WAIT_S) for name, tree in trees.items()}
    finally:
        for pool in pools.values():
            pool.close(grace=1.0)
    print(f"\nprocesses before -> after: {', '.join(f'{n} pool {trees.get(n)} -> {left[n]}' for n in left)}")
    assert not left["idle"], "a cleanly closed pool left processes behind"
    assert not left["stuck"], "closing a pool with a hung worker left processes behind"
    assert not left["terminated"], "a worker ended by SIGTERM left its children behind"
    assert terminated.procs[0].exitcode == 128 + signal.SIGTERM, "the SIGTERM'd worker did not exit through cleanup"


_ORPHAN_SCRIPT = """
import json, os, sys
sys.path[:0] = {path!r}
from harness import WorkerPool
import test_harness

if __name__ == "__main__":
    pool = WorkerPool(1)
    pool.run(test_harness._start_children, (), {{}}, (1, 1, 1), 0, 600)
    print(json.dumps([pid for pid, _ in pool.pids()]), flush=True)
    os._exit(0)   # dies without closing the pool, as a killed pytest would
"""


def test_workers_exit_when_the_test_process_dies(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT.format(path=[os.path.dirname(__file__), *sys.path]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tree = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(tree) >= 4   # the worker, its helper, the helper's child and the plain subprocess
    left = _wait_all_gone(tree, EXIT_WAIT_S)
    print(f"\norphaned pool {tree}: still running after the parent died: {left}")
    assert not left, f"processes outlived the test process that started them: {left}"
