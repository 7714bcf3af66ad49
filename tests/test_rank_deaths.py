"""A rank that dies of a signal is reported as such (runtime/rank_deaths.py, runtime/torchrun.py): by the launcher's
agent, and by the surviving ranks instead of their collective error.

The end-to-end cases run the demo trainer on 2 gloo processes, through our agent and through plain torchrun (no
notes: the survivor sees its dead peer in /proc), and SIGKILL rank 1 mid-step; the wording (OOM evidence or none,
crashes, exit codes), the survivor's wait for a late note, stale notes, a dead peer seen as a zombie and GPU figures
(a stand-in pynvml) are checked on synthetic notes and processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
from slurm_cluster import poll_until
from test_preemption import DEMO_CONFIG, alive, children, fast_overrides, run_env, runs  # noqa: F401 (runs: a fixture)

from megatron_tsdkd.runtime import rank_deaths, torchrun

GIB = 1024 ** 3


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def _kill_rank_1_mid_step(runs, folder, launcher: str, **env) -> tuple[str, dict[int, int]]:
    """The demo on 2 processes through ``launcher``; SIGKILL to rank 1 mid-step. Its output and {rank: pid}, once
    every process has ended, the launcher with exit code 1."""
    argv = [sys.executable, "-m", launcher, "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max_restarts=0",
            "-m", "megatron_tsdkd.cli", "train", "--config", DEMO_CONFIG,
            *fast_overrides(folder / "ckpt", folder / "tb", "schedule.max_steps=1000", "checkpoint.interval=1000")]
    run = runs(argv, str(folder), env=run_env(**env))
    run.wait_output(r"step 2/1000")
    workers = {int(_environ(pid)["RANK"]): pid for pid in children(run.proc.pid)}
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)   # mid-step: rank 0 logs each step as it ends, and they follow at once
    assert run.wait() == 1, run.output()[-3000:]
    poll_until(lambda: not any(alive(pid) for pid in workers.values()), 10, f"the workers {workers} to end")
    out = run.output()
    assert "rollout.engine" not in out and "[rank0]:" not in out, out[-3000:]   # no survivor's traceback
    return out, workers


def _lines(out: str, start: str) -> list[str]:
    found = [line for line in out.splitlines() if line.startswith(start)]
    print("\n".join(found))
    return found


def test_a_rank_killed_mid_step_is_named_by_the_agent_and_by_the_survivor(runs, tmp_path):
    notes = tmp_path / "notes"
    out, workers = _kill_rank_1_mid_step(runs, tmp_path, "megatron_tsdkd.runtime.torchrun",
                                         TSDKD_DEATH_NOTES=str(notes))
    errors, summary = _lines(out, "error: "), _lines(out, "torchrun: rank")
    assert len(errors) == 1 and len(summary) == 1 and "Traceback" not in out, out[-3000:]
    assert re.match(rf"error: rank 1 \(local rank 1, pid {workers[1]} on node \S+\) was killed by SIGKILL: "
                    rf"(not|likely) the kernel's out-of-memory killer \((no OOM kill on its node|OOM kills) since "
                    rf"the job started.*; host memory available [\d.]+ of [\d.]+ GiB at its death, lowest [\d.]+ "
                    rf"GiB in the 10 s before\).*; this rank \(rank 0\) only failed as a consequence: RuntimeError: "
                    rf".*by peer", errors[0]), errors[0]
    assert summary[0].startswith(f"torchrun: rank 1 (local rank 1, pid {workers[1]} on node ") and \
        "was killed by SIGKILL" in summary[0], summary[0]
    written = {note["rank"]: note for note in rank_deaths.read_notes(str(notes))}
    assert written[1]["signal"] == "SIGKILL" and written[1]["pid"] == workers[1], written
    assert written[0]["exit_code"] == 2 and written[0]["signal"] is None, written   # the survivor's own `error:`


def test_under_plain_torchrun_the_survivor_finds_its_dead_peer_in_proc(runs, tmp_path):
    """No agent, no notes: rank 0 remembered rank 1's pid at start-up and sees it die (its exit status while it
    is a zombie, else only that it is gone: torchrun reaps it within its 0.1 s monitor interval)."""
    out, workers = _kill_rank_1_mid_step(runs, tmp_path, "torch.distributed.run")
    (error,) = _lines(out, "error: ")
    assert re.match(rf"error: rank 1 \(pid {workers[1]} on node \S+\) (was killed by SIGKILL|had ended before this "
                    rf"rank failed).*; this rank \(rank 0\) only failed as a consequence: RuntimeError: .*by peer",
                    error), error


# ---------------------------------------------------------------------------------------------------------------
# the wording


def _note(**fields) -> dict:
    memory = {"available": int(0.4 * GIB), "total": int(23.4 * GIB), "lowest_available": int(0.1 * GIB),
              "window_s": 10.0, "oom_kills": {"node": 1, "cgroup": None}, "cgroup": None}
    memory.update(fields.pop("memory", {}))
    note = rank_deaths.death_note(rank=1, local_rank=1, pid=1234, host="n1", signal_number=signal.SIGKILL,
                                  memory=memory)
    note.update(fields)
    return note


def test_a_sigkill_is_put_down_to_the_oom_killer_only_on_its_evidence():
    assert rank_deaths.describe(_note()) == (
        "rank 1 (local rank 1, pid 1234 on node n1) was killed by SIGKILL: likely the kernel's out-of-memory killer "
        "(OOM kills since the job started: 1 on its node; host memory available 0.4 of 23.4 GiB at its death, "
        "lowest 0.1 GiB in the 10 s before)")
    cgroup = _note(memory={"oom_kills": {"node": 0, "cgroup": 2},
                           "cgroup": {"limit": 64 * GIB, "used": 10 * GIB, "peak": 64 * GIB}})
    assert "(OOM kills since the job started: 2 in the job cgroup; host memory" in rank_deaths.describe(cgroup)
    assert "the job's cgroup peaked at 64.0 of its 64.0 GiB limit" in rank_deaths.describe(cgroup)
    none = rank_deaths.describe(_note(memory={"oom_kills": {"node": 0, "cgroup": 0}}))
    assert "killed by SIGKILL: not the kernel's out-of-memory killer (no OOM kill on its node" in none
    assert none.endswith("): a user, Slurm (a cancel, a time limit, KillWait after a stop signal) or another "
                         "supervisor")
    unknown = rank_deaths.describe(_note(memory={"oom_kills": {"node": None, "cgroup": None}}))
    assert "killed by SIGKILL: the out-of-memory killer, a user or Slurm (the OOM kill counters are unreadable" \
        in unknown
    assert "segmentation fault" in rank_deaths.describe(_note(signal="SIGSEGV"))
    assert rank_deaths.describe(_note(signal=None, exit_code=1)) == \
        "rank 1 (local rank 1, pid 1234 on node n1) exited with code 1 (its own error is in its output)"


def test_gpu_figures_come_from_pynvml_where_it_imports(monkeypatch):
    used = iter([70, 79, 75])
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(next(used) if h == 1 else 1) * GIB,
                                                                total=80 * GIB))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    watch = rank_deaths.MemoryWatch()
    for _ in range(3):
        watch.sample()
    figures = watch.figures(gpu=1)
    assert figures["gpu"] == {"index": 1, "peak_used": 79 * GIB, "total": 80 * GIB}
    assert "GPU 1 used up to 79.0 of 80.0 GiB" in rank_deaths.describe(_note(memory=figures))
    monkeypatch.setitem(sys.modules, "pynvml", None)   # not importable: no GPU figures, nothing else changes
    assert "gpu" not in rank_deaths.MemoryWatch().figures(gpu=1)


# ---------------------------------------------------------------------------------------------------------------
# the survivor's side

LOST = "[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:5: Connection closed by peer. This is typically"


@pytest.fixture
def survivor(monkeypatch, tmp_path):
    """Rank 0 of a run whose agent writes death notes into the returned folder."""
    folder = tmp_path / "notes"
    folder.mkdir()
    monkeypatch.setenv(rank_deaths.NOTES_ENV, str(folder))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    monkeypatch.setattr(rank_deaths, "_peers", [])
    return folder


def test_the_survivor_waits_for_a_late_note_when_it_lost_a_peer(survivor, monkeypatch):
    reads = []
    real = rank_deaths.read_notes

    def read_notes(folder):   # the agent's note lands after the survivor's first look
        reads.append(folder)
        if len(reads) == 3:
            rank_deaths.write_note(folder, _note(run="run-a"))
        return real(folder)

    monkeypatch.setattr(rank_deaths, "read_notes", read_notes)
    wrapped = RuntimeError("rollout.engine=vllm: the vLLM replica failed; set rollout.engine=megatron")
    wrapped.__cause__ = RuntimeError(LOST)
    line = rank_deaths.explain_failure(wrapped)
    assert len(reads) == 3 and line == (
        f"{rank_deaths.describe(_note())}; this rank (rank 0) only failed as a consequence: RuntimeError: Read "
        f"error [127.0.0.1]:5: Connection closed by peer."), line


def test_the_survivor_answers_at_once_when_nothing_points_at_a_peer(survivor):
    start = time.monotonic()
    assert rank_deaths.explain_failure(ValueError("a bug of this rank's own"), wait_s=30) is None
    assert time.monotonic() - start < 1
    rank_deaths.write_note(str(survivor), _note(signal=None, exit_code=1, run="run-a"))
    assert rank_deaths.explain_failure(ValueError("a bug of this rank's own"), wait_s=30) is None
    assert "exited with code 1" in rank_deaths.explain_failure(RuntimeError(LOST), wait_s=30)
    rank_deaths.write_note(str(survivor), _note(pid=99, run="run-a"))   # a death by a signal explains any error
    assert "pid 99 on node n1) was killed by SIGKILL" in rank_deaths.explain_failure(ValueError("x"), wait_s=30)
    assert time.monotonic() - start < 1


def test_notes_of_this_rank_other_runs_and_earlier_processes_are_ignored(survivor):
    for stale in (_note(rank=0, run="run-a"), _note(run="run-b"), _note(run="run-a", time=time.time() - 1e6)):
        rank_deaths.write_note(str(survivor), {**stale, "pid": len(os.listdir(survivor))})
    line = rank_deaths.explain_failure(RuntimeError(LOST), wait_s=0.2)
    assert line.startswith("a peer process closed its connection during a collective: it died or was killed"), line
    assert rank_deaths.explain_failure(RuntimeError("Timed out waiting for the store"), wait_s=0.2) is None


def test_without_an_agent_a_dead_peer_on_this_node_is_found_in_proc(monkeypatch):
    monkeypatch.delenv(rank_deaths.NOTES_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    peer = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(rank_deaths, "_peers", [
            {"rank": 0, "host": socket.gethostname(), "pid": os.getpid(), "start": 0},
            {"rank": 1, "host": socket.gethostname(), "pid": peer.pid, "start": rank_deaths._start_ticks(peer.pid)}])
        assert rank_deaths.explain_failure(ValueError("x")) is None   # alive, and the error is this rank's own
        peer.send_signal(signal.SIGKILL)
        poll_until(lambda: (rank_deaths._proc_stat(peer.pid) or ["?"])[0] == "Z", 10, "the peer to be a zombie")
        line = rank_deaths.explain_failure(ValueError("any error"), wait_s=0)   # its exit status, while a zombie
        assert line.startswith(f"rank 1 (pid {peer.pid} on node {socket.gethostname()}) was killed by SIGKILL"), line
    finally:
        peer.kill()
        peer.wait()
    assert rank_deaths.explain_failure(ValueError("x"), wait_s=0) is None   # reaped: gone, but not why
    assert "had ended before this rank failed" in rank_deaths.explain_failure(RuntimeError(LOST), wait_s=0)


# ---------------------------------------------------------------------------------------------------------------
# the agent's side


def test_the_agent_summary_puts_the_first_death_first_and_fills_in_missed_ones(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    watch = torchrun.DeathWatch(str(tmp_path))
    watch.notes[11] = {**_note(rank=1, pid=11), "time": 100.0}
    watch.notes[10] = {**_note(rank=0, local_rank=0, pid=10, signal="SIGTERM"), "time": 101.0}
    failures = {r: ProcessFailure(local_rank=r, pid=pid, exitcode=code, error_file="")
                for r, pid, code in ((0, 10, -15), (1, 11, -9), (2, 12, -6), (3, 13, 1))}
    lines = watch.summary(failures)
    assert lines[0] == f"torchrun: {rank_deaths.describe(watch.notes[11])}"
    assert lines[1] == ("torchrun: rank 0 (local rank 0, pid 10 on node n1) was killed by SIGTERM after rank 1 had "
                        "died (torchrun stops the other workers: SIGTERM, then SIGKILL after its shutdown timeout)")
    assert lines[2].startswith("torchrun: rank 2 (local rank 2, pid 12 on node ") and "SIGABRT" in lines[2]
    assert len(lines) == 3, lines   # rank 3 exited with its own error, which it printed
    assert json.loads((tmp_path / f"{watch.notes[12]['host']}.pid-12.json").read_text())["signal"] == "SIGABRT"


def test_a_worker_read_before_its_exec_is_read_again_and_a_missing_rank_comes_from_torchrun(tmp_path, monkeypatch):
    """Between fork and exec a worker's /proc environment is still the agent's (no RANK): caching that would leave
    its death note without a rank, and the survivor's line with "a worker" instead of "rank 1"."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    environments = iter([{"rank": None, "local_rank": None, "gpu": None, "run": None},
                         {"rank": 1, "local_rank": 1, "gpu": 1, "run": "r"}])
    monkeypatch.setattr(torchrun, "_children", lambda: [21])
    monkeypatch.setattr(torchrun, "_worker_facts", lambda pid: next(environments))
    class Done(Exception):
        pass

    def sleep(seconds):   # the census's pause: end it once the worker's ranks are in
        if 21 in watch.workers:
            raise Done

    monkeypatch.setattr(torchrun.time, "sleep", sleep)
    watch = torchrun.DeathWatch(str(tmp_path))
    with pytest.raises(Done):
        watch._census()
    assert watch.workers[21]["rank"] == 1

    watch.died(22, 9, None)   # a worker whose ranks the census never read
    assert watch.notes[22]["rank"] is None
    lines = watch.summary({3: ProcessFailure(local_rank=3, pid=22, exitcode=-9, error_file="")})
    assert lines[0].startswith("torchrun: rank 3 (local rank 3, pid 22 on node "), lines
    assert json.loads((tmp_path / f"{watch.notes[22]['host']}.pid-22.json").read_text())["rank"] == 3


def test_the_agent_picks_its_notes_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(rank_deaths.NOTES_ENV, str(tmp_path / "given"))
    assert torchrun._notes_folder() == (str(tmp_path / "given"), False)
    monkeypatch.delenv(rank_deaths.NOTES_ENV)
    monkeypatch.setenv("TSDKD_RUN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert torchrun._notes_folder() == (str(tmp_path / "logs" / "death-notes" / "restart-3"), False)
    monkeypatch.delenv("TSDKD_RUN_LOG_DIR")
    folder, private = torchrun._notes_folder()
    os.rmdir(folder)
    assert private and os.path.basename(folder).startswith("tsdkd-death-notes-")
