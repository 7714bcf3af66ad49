"""Stop signals and lost parents through torchrun and the launcher, on the demo models (2 gloo processes, TP=2).

Whichever process a stop signal reaches, the workers save one complete checkpoint and exit 0, or the save never
completes and the previous checkpoint stays ``latest``; a resumed run then logs exactly the losses of an
uninterrupted one (``loss/total`` per step, read from TensorBoard). A worker whose torchrun is killed dies with it,
and so does the process writing its asynchronous checkpoint. The runs save asynchronously (the default), except
the Ctrl-C one, which covers the synchronous save.

Nothing here races the clock: a save "in progress" is held open by the trainer's test hook
(``TSDKD_TEST_HOLD_SAVE``, engines/checkpoint.py) inside the forked checkpoint writer until the test releases it,
and every wait polls an observable state (a file, a log line, /proc) up to a deadline scaled to the machine's load.
The Slurm paths (``scancel --signal=TERM``, plain ``scancel``) are in test_slurm.py; they share these helpers.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from slurm_cluster import poll_until, scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
DEMO_SCRIPT = os.path.join(ROOT, "slurm", "demo_cpu.sh")
HOLD_ENV = "TSDKD_TEST_HOLD_SAVE"
STEPS, INTERVAL = 6, 2
# The demo at a size where a step takes well under a second on 2 cores; every run of this file and of the Slurm
# tests trains exactly this, so one uninterrupted reference serves all.
FAST = ("data.eval=", "checkpoint.export_hf=", "logging.progress_bar=false", "logging.interval=1",
        f"schedule.max_steps={STEPS}", f"checkpoint.interval={INTERVAL}", "checkpoint.resume=auto",
        "batch.global_size=4", "batch.micro_size=2", "rollout.max_new_tokens=8")


def fast_overrides(ckpt, tb, *extra) -> list[str]:
    return [*FAST, f"checkpoint.dir={ckpt}", f"logging.dir={tb}", *extra]


def run_env(**extra) -> dict:
    """The launches' environment. The launcher's per-node check (tsdkd-doctor, ~4 s a node) is off: these tests are
    about signals and resumes, and tests/test_doctor.py runs the launcher with it."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TSDKD_DOCTOR": "0", **extra}


def torchrun_argv(ckpt, tb, *extra) -> list[str]:
    """Plain torchrun, as a user starts it (not the launcher's runtime/torchrun.py)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            "--max_restarts=0", "-m", "megatron_tsdkd.cli", "train", "--config", DEMO_CONFIG,
            *fast_overrides(ckpt, tb, *extra)]


class Run:
    """A process tree started in a session of its own, output to ``<dir>/out.txt``; killed at teardown."""

    def __init__(self, argv, folder, env=None):
        os.makedirs(folder, exist_ok=True)
        self.out_path = os.path.join(folder, "out.txt")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env or run_env(), stdout=open(self.out_path, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {scaled(timeout):.0f} s:\n{self.output()[-3000:]}") from None

    def wait_output(self, pattern: str, timeout: float = 120):
        return poll_until(lambda: re.search(pattern, self.output()) or self._ended(pattern), timeout,
                          f"/{pattern}/ in the output:\n{self.output()[-3000:]}")

    def _ended(self, what):
        if self.proc.poll() is not None:
            raise AssertionError(f"ended ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
        return None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # the workers follow (runtime/parent_watch.py)
            except ProcessLookupError:
                pass
            self.proc.wait()


@pytest.fixture
def runs():
    started = []

    def start(argv, folder, env=None) -> Run:
        started.append(Run(argv, folder, env))
        return started[-1]

    yield start
    for run in started:
        run.kill()


# ---------------------------------------------------------------------------------------------------------------
# observing processes and checkpoints


def children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def alive(pid: int) -> bool:
    state = _status(pid).get("State", "")
    return bool(state) and state[0] not in "ZX"


def parent(pid: int) -> int:
    return int(_status(pid).get("PPid", "0"))


def pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, blocked, for ``pid`` (its thread's or its process's pending set)."""
    status = _status(pid)
    return any(int(status.get(key, "0"), 16) >> (sig - 1) & 1 for key in ("SigPnd", "ShdPnd"))


def latest_name(ckpt) -> str | None:
    path = os.path.join(ckpt, "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def verify_checkpoint(folder) -> None:
    from megatron_tsdkd.models.run_folder import verify

    verify(str(folder))


def assert_complete_latest(ckpt, step: int) -> None:
    """``latest`` names step ``step``'s checkpoint, whose manifest checks out."""
    from megatron_tsdkd.models.run_folder import latest_checkpoint, verify

    folder = latest_checkpoint(str(ckpt))
    assert folder is not None and os.path.basename(folder) == f"step_{step:06d}", (folder, os.listdir(ckpt))
    verify(folder)


def logged_losses(tb) -> dict[int, float]:
    """``loss/total`` per step as TensorBoard holds it (float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss/total")} if "loss/total" in acc.Tags()["scalars"] else {}


def stopped_step(output: str) -> int:
    found = re.findall(r"stopped by a signal at step (\d+)", output)
    assert found, output[-3000:]
    return int(found[-1])


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted run (cached for the session: test_slurm.py uses it too)."""
    base = tmp_path_factory.getbasetemp()
    cache = base / "preemption-reference.json"
    if cache.exists():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    folder = base / "preemption-reference"
    run = Run(torchrun_argv(folder / "ckpt", folder / "tb"), str(folder))
    try:
        assert run.wait() == 0, run.output()[-3000:]
    finally:
        run.kill()
    losses = logged_losses(folder / "tb")
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    cache.write_text(json.dumps(losses))
    return losses


def assert_resume_is_exact(runs, ckpt, folder, from_step: int, reference: dict[int, float],
                           before: dict[int, float]) -> None:
    """Resume from ``ckpt`` (plain torchrun, its own TensorBoard folder) and compare every logged loss with the
    uninterrupted run's, bit for bit: the resumed steps, and ``before`` (what the interrupted run logged)."""
    run = runs(torchrun_argv(ckpt, os.path.join(folder, "tb_resumed")), folder)
    assert run.wait() == 0, run.output()[-3000:]
    assert re.search(rf"resumed from \S*step_0*{from_step}\b", run.output()), run.output()[-3000:]
    resumed = logged_losses(os.path.join(folder, "tb_resumed"))
    assert resumed == {s: reference[s] for s in range(from_step + 1, STEPS + 1)}, (resumed, reference)
    assert before == {s: reference[s] for s in before}, (before, reference)


# ---------------------------------------------------------------------------------------------------------------


def held_torchrun(runs, tmp_path, step: int):
    """A plain torchrun job whose checkpoint writers hold the save of ``step`` open (HOLD_ENV); returns once one is
    held: (run, the hold folder, the held markers, checkpoint dir, TensorBoard dir)."""
    hold = tmp_path / "hold"
    hold.mkdir()
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    run = runs(torchrun_argv(ckpt, tb), str(tmp_path / "cut"), env=run_env(**{HOLD_ENV: f"{step}:{hold}"}))
    held = poll_until(lambda: list(hold.glob("held.*")) or run._ended("a held save"), 150,
                      f"a checkpoint writer held in the save of step {step}")
    return run, hold, held, ckpt, tb


def test_sigterm_to_torchrun_mid_save_completes_that_save(runs, reference, tmp_path):
    """Plain torchrun: its SIGTERM handler signals each worker's whole process group (the process writing the
    asynchronous checkpoint and the file writers it forked included), and SIGKILLs them 30 s later. The write in
    progress completes; the save the signal asks for is of the step the trainer reached meanwhile (2 to 4: the save
    of step 4 waits for that write), complete and ``latest``; the resumed run is exact."""
    run, hold, held, ckpt, tb = held_torchrun(runs, tmp_path, 2)
    writer = int(held[0].name.split(".")[1])
    workers = children(run.proc.pid)
    assert len(workers) == 2 and parent(parent(writer)) in workers, (workers, writer)
    assert os.getpgid(writer) == os.getpgid(parent(parent(writer)))   # what torchrun's shutdown signals

    run.proc.send_signal(signal.SIGTERM)
    run.wait_output(r"closing signal SIGTERM")
    poll_until(lambda: pending(writer, signal.SIGTERM), 30, "the SIGTERM to wait, blocked, in the held writer")
    assert alive(writer) and alive(parent(writer)) and all(alive(w) for w in workers)
    (hold / "release").touch()
    run.wait()
    out = run.output()
    step = stopped_step(out)
    assert 2 <= step <= 2 * INTERVAL, out[-3000:]
    assert "BrokenPipeError" not in out and not re.search(r"\[rank\d\]:.*Error", out), out[-3000:]
    verify_checkpoint(ckpt / "step_000002")   # the write the signal came in
    assert_complete_latest(ckpt, step)
    assert not list(ckpt.glob("*.partial")), os.listdir(ckpt)
    assert_resume_is_exact(runs, ckpt, str(tmp_path / "resumed"), step, reference, logged_losses(tb))


def test_kill_9_mid_async_write_keeps_latest_on_the_previous_checkpoint(runs, reference, tmp_path):
    """kill -9 of torchrun while the asynchronous write of step 4 is held open (the trainer trains on meanwhile):
    the workers die with torchrun, the writing processes with their workers. Step 4 stays ``step_000004.partial``,
    ``latest`` names step 2, and the resumed run is exact."""
    run, hold, held, ckpt, tb = held_torchrun(runs, tmp_path, 2 * INTERVAL)
    assert latest_name(ckpt) == "step_000002"
    workers = children(run.proc.pid)
    tree = workers + [p for w in workers for p in children(w)] + [int(h.name.split(".")[1]) for h in held]
    assert len(workers) == 2 and len(tree) > 2 + len(held), tree   # each worker has a writing process

    run.kill()
    poll_until(lambda: not any(alive(p) for p in tree), 10, f"the workers and their writers {tree} to end")
    assert_complete_latest(ckpt, 2)
    partial = ckpt / "step_000004.partial"
    assert partial.is_dir() and not (partial / "manifest.json").exists(), sorted(os.listdir(ckpt))
    assert not (ckpt / "step_000004").exists(), sorted(os.listdir(ckpt))
    assert_resume_is_exact(runs, ckpt, str(tmp_path / "resumed"), 2, reference, logged_losses(tb))


def test_ctrl_c_to_the_launcher_mid_step_saves_and_exits_0(runs, reference, tmp_path):
    """slurm/demo_cpu.sh (the launcher, no Slurm) and Ctrl-C: SIGINT to its whole foreground process group
    (launcher, torchrun, tee; the workers sit in sessions of their own). Every process exits 0 after one save.
    Synchronous saves here (``checkpoint.async_save=false``): the other runs cover the asynchronous ones."""
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    env = run_env(TSDKD_LOG_DIR=str(tmp_path / "logs"), NPROC_PER_NODE="2")
    run = runs([DEMO_SCRIPT, *fast_overrides(ckpt, tb, "checkpoint.async_save=false")], str(tmp_path / "cut"),
               env=env)
    poll_until(lambda: latest_name(ckpt) or run._ended("the first checkpoint"), 150, "the first checkpoint")
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()[-3000:]
    out = run.output()
    step = stopped_step(out)
    assert INTERVAL <= step < STEPS and "launch.sh: stopped on INT (exit code 0)" in out, out[-3000:]
    assert "passed SIGINT on to worker" in out, out[-3000:]
    assert_complete_latest(ckpt, step)
    assert not list(ckpt.glob("*.partial")), os.listdir(ckpt)
    assert_resume_is_exact(runs, ckpt, str(tmp_path / "resumed"), step, reference, logged_losses(tb))


def test_kill_9_of_torchrun_ends_its_workers(runs, tmp_path):
    run = runs(torchrun_argv(tmp_path / "ckpt", tmp_path / "tb", "schedule.max_steps=1000"), str(tmp_path))
    run.wait_output(r"step 1/1000")
    workers = children(run.proc.pid)
    assert len(workers) == 2 and all(alive(w) for w in workers), workers
    run.proc.kill()
    run.proc.wait()
    killed = time.monotonic()
    poll_until(lambda: not any(alive(w) for w in workers), 5, "the workers of a killed torchrun to end")
    print(f"workers ended {time.monotonic() - killed:.2f} s after torchrun was killed")


def test_launcher_stops_a_config_error_with_its_one_line(tmp_path):
    """The launcher's dry run: a bad key is one `error:` line and exit 2, and torchrun never starts."""
    logs = tmp_path / "logs"
    done = subprocess.run([DEMO_SCRIPT, "method.beta=1.5", f"checkpoint.dir={tmp_path / 'ckpt'}"], cwd=ROOT,
                          env=run_env(TSDKD_LOG_DIR=str(logs)), capture_output=True, text=True,
                          timeout=scaled(120))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "method.beta" in lines[0], done.stderr
    assert not list(logs.glob("*/node-*.log")), list(logs.rglob("*"))   # no torchrun, no node log
