"""The job scripts on a real Slurm (slurm-wlm from Debian) brought up on this machine: one and two nodes, srun +
torchrun + c10d rendezvous, exit codes, and USR1 -> checkpoint -> requeue -> resume. Jobs run as root.

Two kinds of jobs: with tests/standin_trainer.py (a few-second gloo program with the trainer's signal contract, via
TSDKD_TRAIN_CMD) the launcher is proven on its own; with the real trainer (configs/demo_cpu.yaml) the whole path.
Where Slurm cannot be installed (not root, no apt) every test here fails with the reason.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from slurm_cluster import LocalSlurmCluster, SlurmUnavailable, ensure_debian_packages, slurm_time, time_factor, which

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "slurm", "demo_cpu.sh")
STANDIN = f"{sys.executable} {os.path.join(ROOT, 'tests', 'standin_trainer.py')}"


def _unavailable(reason: str):
    """A machine that cannot run Slurm (or shellcheck) fails these tests: a skipped check proves nothing."""
    pytest.fail(f"{reason}: these tests need a local Slurm (slurm-wlm from Debian, installed as root) and shellcheck")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    try:
        with LocalSlurmCluster(str(workdir), nodes=2) as running:
            yield running
    except SlurmUnavailable as error:
        _unavailable(f"cannot bring up Slurm here: {error}")


class Job:
    """A submitted job script with its own output file, log folder and checkpoint folder."""

    def __init__(self, cluster, tmp_path, *args, nodes=1, nproc=2, env=None, sbatch_wait=False, timeout=240):
        self.cluster, self.dir = cluster, tmp_path
        self.out = tmp_path / "job.out"
        self.ckpt = tmp_path / "ckpt"
        limit = math.ceil(10 * time_factor())   # minutes: Slurm's own bound on a job that hangs
        options = (f"--nodes={nodes}", f"--output={self.out}", f"--error={self.out}", f"--time={limit}")
        # the per-node check (tsdkd-doctor) is tests/test_doctor.py's: off here, ~4 s a node saved per launch
        job_env = {"TSDKD_LOG_DIR": str(tmp_path / "logs"), "NPROC_PER_NODE": str(nproc), "TSDKD_DOCTOR": "0",
                   **(env or {})}
        self.id, self.rc = cluster.sbatch(DEMO, *args, options=options, wait=sbatch_wait, cwd=ROOT, env=job_env,
                                          timeout=timeout)
        self.final_state: dict = {}
        if sbatch_wait:
            self.final_state = self.state()

    def output(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def state(self) -> dict:
        return self.cluster.job(self.id)

    def wait_finished(self, timeout: float = 120) -> dict:
        """Poll (faster than `sbatch --wait`'s back-off) until the job ends; its final `scontrol show job` record."""
        def ended():
            s = self.state()
            if not s:
                raise AssertionError(f"job {self.id} was forgotten before it was seen ending:\n{self.output()}")
            return s if s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None
        self.final_state = self.cluster.wait_for(ended, timeout, f"job {self.id} to end:\n{self.output()}", poll=0.3)
        return self.final_state

    def assert_completed(self):
        """The job's final state and exit code (and sbatch's, if it waited), and the launcher's last word."""
        out = self.output()
        if self.rc is not None:
            assert self.rc == 0, f"sbatch --wait exited {self.rc}; job output:\n{out}"
        state = self.final_state
        assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, out)
        assert out.rstrip().endswith("launch.sh: training finished"), out

    def wait_output(self, pattern: str, timeout: float = 90):
        return self.cluster.wait_for(lambda: re.search(pattern, self.output()), timeout,
                                     f"/{pattern}/ in the output of job {self.id}:\n{self.output()}", poll=0.2)

    def release_requeued(self, timeout: float = 60):
        """Slurm holds a requeued job ~2 minutes (BeginTime); let it start as soon as that is safe."""
        def requeued():
            s = self.state()
            return s if s.get("JobState") == "PENDING" and int(s.get("Restarts", "0")) >= 1 else None
        pending = self.cluster.wait_for(requeued, timeout, f"job {self.id} to be requeued:\n{self.output()}", poll=0.2)
        seen = time.time()
        # What the hold protects against: slurmd refuses a job credential created in the same second as (or before)
        # the revocation of the old run's ("Job credential revoked"). That revocation is stamped at the requeue
        # (the job's new SubmitTime) and at the latest when the old run had ended, before the job showed PENDING.
        # So: once the clock has passed both seconds and no node is still completing the old run.
        revoked = max(slurm_time(pending.get("SubmitTime")) or seen, seen)

        def safe():
            busy = [n for n, st in self.cluster.node_states().items() if st.rstrip("*").startswith("comp")]
            return not busy and time.time() >= math.floor(revoked) + 1.05
        self.cluster.wait_for(safe, timeout, f"job {self.id}'s old run to be cleaned up", poll=0.1)
        self.cluster.run("scontrol", "update", f"JobId={self.id}", "StartTime=now")


def standin_runs(job) -> list[dict]:
    path = job.ckpt / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def standin_env(tmp_path):
    config = tmp_path / "standin.yaml"
    config.write_text("# the stand-in trainer reads only its overrides\n")
    return {"TSDKD_TRAIN_CMD": STANDIN, "TSDKD_CONFIG": str(config)}


# ---------------------------------------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
    try:
        ensure_debian_packages(("shellcheck",))
    except SlurmUnavailable as error:
        _unavailable(f"shellcheck unavailable: {error}")
    scripts = sorted(os.path.join("slurm", f) for f in os.listdir(os.path.join(ROOT, "slurm")) if f.endswith(".sh"))
    assert len(scripts) >= 5, scripts
    done = subprocess.run([which("shellcheck"), "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_standin_two_nodes_rendezvous(cluster, tmp_path):
    job = Job(cluster, tmp_path, f"checkpoint.dir={tmp_path / 'ckpt'}", "schedule.max_steps=3", nodes=2,
              env=standin_env(tmp_path))
    job.wait_finished()
    job.assert_completed()
    (run,) = standin_runs(job)
    assert run == {"world": 4, "first_step": 0, "last_step": 3, "stopped_by": None, "restart": 0,
                   "hosts": ["tsdkd-n1", "tsdkd-n2"]}
    assert "rendezvous tsdkd-n1:" in job.output()
    for node in ("tsdkd-n1", "tsdkd-n2"):  # global rank 0 (which prints) may sit on either node
        assert f"node {node}: 2 processes" in (tmp_path / "logs" / str(job.id) / f"node-{node}.log").read_text()


def test_standin_failure_exit_code_propagates(cluster, tmp_path):
    job = Job(cluster, tmp_path, "schedule.max_steps=3", env=standin_env(tmp_path),  # no checkpoint.dir: KeyError
              sbatch_wait=True)
    assert job.rc != 0, job.output()
    state = job.final_state
    assert state.get("JobState") == "FAILED" and state.get("ExitCode") != "0:0", state
    assert "training failed with exit code" in job.output() and "KeyError" in job.output()


def test_standin_usr1_to_the_step_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """USR1 straight to every process of the running step (--signal=USR1@grace without B:, or `scancel
    --signal=USR1 <job>`). The batch-shell path (--signal=B:USR1@grace) runs with the real trainer below."""
    target, nodes = "step", 1
    steps = 30
    job = Job(cluster, tmp_path, f"checkpoint.dir={tmp_path / 'ckpt'}", f"schedule.max_steps={steps}",
              "standin.step_seconds=0.1", nodes=nodes, env=standin_env(tmp_path))
    job.wait_output(r"standin: step 2/")
    cluster.run("scancel", *(["--batch"] if target == "batch" else []), "--signal=USR1", str(job.id))
    job.release_requeued()
    job.wait_finished()
    job.assert_completed()
    first, second = standin_runs(job)
    assert first["stopped_by"] == "SIGUSR1" and 2 <= first["last_step"] < steps and first["restart"] == 0, first
    assert second == {"world": 2 * nodes, "first_step": first["last_step"], "last_step": steps, "stopped_by": None,
                      "restart": 1, "hosts": ["tsdkd-n1", "tsdkd-n2"][:nodes]}
    assert "requeueing job" in job.output() and "(restart 1)" in job.output()


# ---------------------------------------------------------------------------------------------------------------
# With the real trainer (configs/demo_cpu.yaml)


def demo_overrides(tmp_path, steps, *extra):
    return (f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'tb'}", f"schedule.max_steps={steps}",
            f"checkpoint.export_hf={tmp_path / 'student_hf'}", "data.eval=", "logging.progress_bar=false",
            "checkpoint.resume=auto", *extra)


def latest_step(ckpt) -> int:
    from megatron_tsdkd.models.run_folder import latest_checkpoint

    folder = latest_checkpoint(str(ckpt)) if os.path.isdir(ckpt) else None
    return int(folder.rstrip("/").rsplit("_", 1)[1]) if folder else -1


def test_demo_two_nodes(cluster, tmp_path):
    job = Job(cluster, tmp_path, *demo_overrides(tmp_path, 3), nodes=2, nproc=1)
    job.wait_finished(timeout=180)
    job.assert_completed()
    assert latest_step(job.ckpt) == 3, job.output()
    assert "rendezvous tsdkd-n1:" in job.output()


def test_demo_usr1_saves_requeues_and_resumes(cluster, tmp_path):
    """The demo on one node (2 processes) to the end, through a USR1 -> checkpoint -> requeue -> resume."""
    steps = 16
    job = Job(cluster, tmp_path, *demo_overrides(tmp_path, steps, "checkpoint.interval=2"))
    cluster.wait_for(lambda: latest_step(job.ckpt) >= 2, 150, f"a first checkpoint:\n{job.output()}")
    cluster.run("scancel", "--batch", "--signal=USR1", str(job.id))
    job.release_requeued(timeout=120)
    stopped_at = latest_step(job.ckpt)
    assert 2 <= stopped_at < steps, job.output()
    job.wait_finished(timeout=240)
    job.assert_completed()
    out = job.output()
    assert "requeueing job" in out and re.search(rf"resumed from .*step_0*{stopped_at}\b", out), out
    assert latest_step(job.ckpt) == steps, out


# ---------------------------------------------------------------------------------------------------------------
# Stop signals on Slurm, with the real trainer at the size of test_preemption.py (its helpers and reference run)

from test_preemption import (HOLD_ENV, INTERVAL, STEPS, alive, assert_complete_latest,  # noqa: E402
                             assert_resume_is_exact, fast_overrides, latest_name, logged_losses, reference, runs,
                             stopped_step)

__all__ = ["reference", "runs"]   # fixtures used below


def test_demo_scancel_term_saves_exits_0_and_resume_is_exact(cluster, runs, reference, tmp_path):
    """`scancel --signal=TERM`: SIGTERM to every process of the running step (task shell, torchrun, workers, tee),
    not to the batch shell. One save, every process exits 0, the job completes without requeueing."""
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    job = Job(cluster, tmp_path, *fast_overrides(ckpt, tb))
    cluster.wait_for(lambda: latest_name(ckpt) or job.state().get("JobState") not in ("PENDING", "RUNNING"), 150,
                     f"a first checkpoint:\n{job.output()}", poll=0.2)
    cluster.run("scancel", "--signal=TERM", str(job.id))
    state = job.wait_finished()
    out = job.output()
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, out)
    assert "launch.sh: stopped on TERM after saving a checkpoint; not requeueing" in out, out
    step = stopped_step(out)
    assert INTERVAL <= step < STEPS, out
    assert_complete_latest(ckpt, step)
    assert not list(ckpt.glob("*.partial")), sorted(os.listdir(ckpt))
    assert_resume_is_exact(runs, ckpt, str(tmp_path / "resumed"), step, reference, logged_losses(tb))


def test_demo_plain_scancel_kills_a_save_past_killwait_and_the_previous_latest_stays(cluster, runs, reference,
                                                                                     tmp_path):
    """Plain `scancel`: SIGTERM to every process of the job, SIGKILL KillWait (10 s here) later. The save of step 4
    is held open past that: it is killed half-written, stays step_000004.partial, and `latest` still names step 2,
    which the next run resumes from, exactly."""
    ckpt, tb, hold = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "hold"
    hold.mkdir()
    job = Job(cluster, tmp_path, *fast_overrides(ckpt, tb), env={HOLD_ENV: f"{2 * INTERVAL}:{hold}"})
    held = cluster.wait_for(lambda: list(hold.glob("held.*")) or job.state().get("JobState") not in
                            ("PENDING", "RUNNING"), 150, f"the save of step 4 held:\n{job.output()}", poll=0.2)
    assert latest_name(ckpt) == "step_000002", job.output()
    cluster.run("scancel", str(job.id))
    state = job.wait_finished()
    assert state.get("JobState") == "CANCELLED", (state, job.output())
    writers = [int(h.name.split(".")[1]) for h in held]
    # killed, not finished: a writer ends with its parent (PDEATHSIG) or slurmd's KillWait SIGKILL, which a busy
    # machine may deliver a moment after the job reads CANCELLED; none may outlive that by more than a few seconds
    cluster.wait_for(lambda: not any(alive(w) for w in writers), 15, f"the held writers {writers} to end", poll=0.2)
    assert_complete_latest(ckpt, 2)
    partial = ckpt / "step_000004.partial"
    assert partial.is_dir() and not (partial / "manifest.json").exists(), sorted(os.listdir(ckpt))
    assert_resume_is_exact(runs, ckpt, str(tmp_path / "resumed"), 2, reference, {})


def test_demo_config_error_is_one_line_before_srun(cluster, tmp_path):
    """The launcher's dry run in the batch shell: one `error:` line, exit code 2, no step started."""
    job = Job(cluster, tmp_path, "method.beta=1.5", f"checkpoint.dir={tmp_path / 'ckpt'}", sbatch_wait=True)
    out = job.output()
    assert job.rc != 0 and job.final_state.get("ExitCode") == "2:0", (job.final_state, out)
    assert [line for line in out.splitlines() if "error" in line.lower()] == \
        [next(line for line in out.splitlines() if line.startswith("error: ") and "method.beta" in line)], out
    assert "rendezvous" not in out and not list((tmp_path / "logs").glob("*/node-*.log")), out
