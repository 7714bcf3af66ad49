"""A real Slurm cluster on this one machine, for tests: munged, slurmctld and one slurmd per node, all on 127.0.0.1.

Debian's slurm-wlm and munge are installed with apt when missing (root only). Every daemon writes its state, logs
and PID file under one work folder and is stopped by PID at teardown; ports are picked free, so a crashed earlier
session cannot get in the way. Node names are added to /etc/hosts (as 127.0.0.1) because the launcher's torchrun
rendezvous resolves them, and removed again at teardown.

Use from pytest (``LocalSlurmCluster(workdir, nodes=2)`` as a context manager) or by hand:
    python tests/slurm_cluster.py up /tmp/slurm    # prints the SLURM_CONF to export
    python tests/slurm_cluster.py down /tmp/slurm

Nothing here sleeps for a fixed time: every wait polls a state (a node idle, a job in a state, a PID gone) up to a
deadline, and every deadline is multiplied by ``time_factor()``: ``TSDKD_TEST_TIME_FACTOR`` (default 1) times the
machine's load per core (1-minute load average over the CPU count, counted from 1 to at most 4), so a busy machine
gets more time and a stuck daemon still fails in bounded time.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from typing import Optional

PACKAGES = {"sbatch": "slurm-wlm", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge",
            "shellcheck": "shellcheck"}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
HOSTS_FILE = "/etc/hosts"
HOSTS_MARK = "# tsdkd-test-slurm"
MUNGE_KEY = "/etc/munge/munge.key"
MUNGE_RUN = "/run/munge"
TIME_FACTOR_ENV = "TSDKD_TEST_TIME_FACTOR"
MAX_LOAD_FACTOR = 4.0


def time_factor() -> float:
    """How much longer than on an idle machine to wait (see the module doc)."""
    raw = os.environ.get(TIME_FACTOR_ENV, "1")
    try:
        base = float(raw)
    except ValueError:
        raise ValueError(f"{TIME_FACTOR_ENV} must be a number, got {raw!r}") from None
    if base <= 0:
        raise ValueError(f"{TIME_FACTOR_ENV} must be > 0, got {raw!r}")
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    return base * min(MAX_LOAD_FACTOR, max(1.0, load))


def scaled(seconds: float) -> float:
    """``seconds`` on an idle machine, as a deadline here and now."""
    return seconds * time_factor()


def poll_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """``predicate()``'s first truthy value, polled every ``interval`` s for up to ``scaled(timeout)`` s; else
    TimeoutError naming ``what``."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {limit:.0f} s ({timeout:.0f} s x time factor) waiting for {what}")
        time.sleep(interval)


def slurm_time(value: str) -> Optional[float]:
    """Seconds since the epoch of a Slurm timestamp (``2026-12-02T06:21:39``, local time); None if not a time."""
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except (TypeError, ValueError):
        return None


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (not root, no apt); the message says why (tests skip with it, visibly)."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but a daemon did not come up: a real failure, with the daemon's log."""


def which(command: str) -> Optional[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(command, path=path)


def ensure_debian_packages(commands: tuple[str, ...]) -> None:
    """Install the Debian packages that provide ``commands`` if any is missing; SlurmUnavailable if we cannot."""
    missing = sorted({PACKAGES[c] for c in commands if which(c) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not running as root to apt-get install them")
    if which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SlurmUnavailable(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    still = [c for c in commands if which(c) is None]
    if still:
        raise SlurmUnavailable(f"apt-get installed {', '.join(missing)} but {', '.join(still)} is still missing")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free right now (held open together so they differ)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _stop_pid_file(path: str, timeout: float = 10.0) -> None:
    """SIGTERM the daemon whose PID is in ``path``, then SIGKILL if it lingers."""
    try:
        with open(path) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        poll_until(lambda: not _pid_alive(pid), timeout, f"{os.path.basename(path)}'s PID {pid} to exit",
                   interval=0.1)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


class LocalSlurmCluster:
    """``nodes`` Slurm nodes named ``tsdkd-n1 ...`` on this host, one partition, jobs run as root."""

    def __init__(self, workdir: str, nodes: int = 2, name_prefix: str = "tsdkd-n"):
        self.workdir = os.path.abspath(workdir)
        self.node_names = [f"{name_prefix}{i + 1}" for i in range(nodes)]
        self.conf_path = os.path.join(self.workdir, "slurm.conf")
        self.cpus = os.cpu_count() or 1
        self._started_munged = False

    # ---- environment for clients ----
    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
        return dict(os.environ, SLURM_CONF=self.conf_path, PATH=path)

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=scaled(timeout))
        if check and done.returncode:
            raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
        return done

    # ---- bring-up ----
    def start(self) -> "LocalSlurmCluster":
        ensure_debian_packages(("sbatch", "slurmctld", "slurmd", "munged"))
        os.makedirs(os.path.join(self.workdir, "state"), exist_ok=True)
        try:
            self._start_munged()
            self._add_hosts()
            self._write_conf()
            self._daemon(["slurmctld", "-f", self.conf_path], "slurmctld")
            for node in self.node_names:
                self._daemon(["slurmd", "-f", self.conf_path, "-N", node], f"slurmd.{node}")
            self._wait_idle(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        """Reuse a working munged; otherwise start one as the munge user with the Debian key (created if absent)."""
        if self._munge_works():
            return
        munge = pwd.getpwnam("munge")
        os.makedirs(MUNGE_RUN, exist_ok=True)
        os.chown(MUNGE_RUN, munge.pw_uid, munge.pw_gid)
        os.chmod(MUNGE_RUN, 0o755)
        if not os.path.isfile(MUNGE_KEY):
            subprocess.run([which("mungekey") or "mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
            os.chmod(MUNGE_KEY, 0o400)
        pid_file = os.path.join(MUNGE_RUN, "munged.pid")
        log = os.path.join(MUNGE_RUN, "munged-tsdkd-test.log")  # the munge user cannot enter pytest's 0700 folders
        done = subprocess.run(["runuser", "-u", "munge", "--", which("munged") or "munged", f"--pid-file={pid_file}",
                               f"--log-file={log}"], capture_output=True, text=True)
        if done.returncode:
            raise SlurmStartError(f"munged did not start ({done.returncode}): {done.stderr.strip()} "
                                   f"{self._tail(log)}")
        self._started_munged = True
        try:
            poll_until(self._munge_works, 10, "munged to answer `munge -n | unmunge`")
        except TimeoutError as error:
            raise SlurmStartError(f"munged started but `munge -n | unmunge` fails ({error}); {self._tail(log)}") \
                from None

    @staticmethod
    def _munge_works() -> bool:
        munge, unmunge = which("munge"), which("unmunge")
        if not munge or not unmunge:
            return False
        cred = subprocess.run([munge, "-n"], capture_output=True)
        return cred.returncode == 0 and subprocess.run([unmunge], input=cred.stdout, capture_output=True).returncode == 0

    def _add_hosts(self) -> None:
        with open(HOSTS_FILE) as f:
            known = {name for line in f if not line.lstrip().startswith("#") for name in line.split()[1:]}
        missing = [n for n in self.node_names if n not in known]
        if missing:
            with open(HOSTS_FILE, "a") as f:
                f.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")

    def _remove_hosts(self) -> None:
        try:
            with open(HOSTS_FILE) as f:
                lines = f.readlines()
        except OSError:
            return
        kept = [line for line in lines if HOSTS_MARK not in line]
        if len(kept) != len(lines):
            with open(HOSTS_FILE, "w") as f:  # in place: /etc/hosts may be a bind mount that cannot be replaced
                f.writelines(kept)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.node_names))
        w = self.workdir
        lines = [
            "ClusterName=tsdkdtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool.%n",
            f"SlurmctldPidFile={w}/slurmctld.pid", f"SlurmdPidFile={w}/slurmd.%n.pid",
            f"SlurmctldLogFile={w}/slurmctld.log", f"SlurmdLogFile={w}/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_min_interval=0",  # start a submitted job at once, not up to 2 s later
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=4",        # finished jobs leave the controller quickly, so `sbatch --wait` returns quickly
            "KillWait=10",        # SIGTERM -> SIGKILL grace when a job is cancelled or times out
            "InactiveLimit=0", "Waittime=0",
        ]
        for node, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} Port={port} CPUs={self.cpus} "
                         "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _daemon(self, argv: list[str], name: str) -> None:
        done = subprocess.run([which(argv[0]) or argv[0], *argv[1:]], env=self.env, capture_output=True, text=True)
        if done.returncode:
            log = os.path.join(self.workdir, f"{name}.log")
            raise SlurmStartError(f"{name} did not start ({done.returncode}): {done.stderr.strip()} {self._tail(log)}")

    def node_states(self) -> dict[str, str]:
        """Node name -> state as sinfo prints it (``idle``, ``mixed``, ``completing``...; ``*`` = not responding)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)

    def _wait_idle(self, timeout: float) -> None:
        states = {}

        def idle() -> bool:
            nonlocal states
            states = self.node_states()
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names)

        try:
            poll_until(idle, timeout, "every node to be idle", interval=0.5)
        except TimeoutError as error:
            logs = " ".join(self._tail(os.path.join(self.workdir, f"{n}.log"))
                            for n in ["slurmctld", *[f"slurmd.{x}" for x in self.node_names]])
            raise SlurmStartError(f"{error}: {states}; {logs}") from None

    @staticmethod
    def _tail(path: str, chars: int = 800) -> str:
        try:
            with open(path, errors="replace") as f:
                return f"[{path}: ...{f.read()[-chars:]}]"
        except OSError:
            return f"[{path}: none]"

    # ---- jobs ----
    def sbatch(self, script: str, *script_args: str, options: tuple[str, ...] = (), wait: bool = False,
               cwd: Optional[str] = None, env: Optional[dict] = None, timeout: float = 300) -> tuple[int, Optional[int]]:
        """Submit; returns (job id, sbatch's exit code or None). With ``wait`` sbatch returns when the job ends."""
        argv = [which("sbatch") or "sbatch", "--parsable", *(["--wait"] if wait else []), *options, script,
                *script_args]
        done = subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=scaled(timeout))
        first = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
        if not first.split(";")[0].isdigit():
            raise RuntimeError(f"sbatch gave no job id (exit {done.returncode}): {done.stdout} {done.stderr}")
        return int(first.split(";")[0]), (done.returncode if wait else None)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the controller has forgotten the job, MinJobAge after it ended)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode:
            return {}
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5):
        """``predicate()``'s first truthy value within ``timeout`` seconds (scaled, see ``time_factor``)."""
        return poll_until(predicate, timeout, what, interval=poll)

    def cancel_all(self) -> None:
        if which("scancel") and os.path.isfile(self.conf_path):
            self.run("scancel", "--full", "--user=root", check=False)

    # ---- tear-down ----
    def stop(self) -> None:
        self.cancel_all()
        for node in self.node_names:
            _stop_pid_file(os.path.join(self.workdir, f"slurmd.{node}.pid"))
        _stop_pid_file(os.path.join(self.workdir, "slurmctld.pid"))
        if self._started_munged:
            _stop_pid_file(os.path.join(MUNGE_RUN, "munged.pid"))
            self._started_munged = False
        self._remove_hosts()

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = LocalSlurmCluster(argv[1])
    state = os.path.join(cluster.workdir, "cluster.json")
    if argv[0] == "up":
        cluster.start()
        with open(state, "w") as f:
            json.dump({"started_munged": cluster._started_munged}, f)
        print(f"export SLURM_CONF={cluster.conf_path}")
    else:
        if os.path.isfile(state):
            with open(state) as f:
                cluster._started_munged = json.load(f)["started_munged"]
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
