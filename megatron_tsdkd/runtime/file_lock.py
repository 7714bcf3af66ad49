"""An exclusive lock between processes on one shared file system (the tokenised-data cache's: one process builds,
the others wait), that works where ``flock`` is refused and that a holder killed with kill -9 cannot keep.

Two ways, chosen on the first try of each lock:
- ``flock`` on ``<path>`` (kept in place after release, so waiters share its inode): the kernel releases it when its
  holder dies. Waiters poll it (LOCK_NB) instead of blocking, so a wait can time out.
- where the file system refuses ``flock`` (Lustre mounted without ``-o flock``, NFS without a lock daemon, some FUSE
  mounts: ENOSYS, ENOLCK, EOPNOTSUPP or EINVAL), an exclusive-create lock file ``<path>.held`` (O_CREAT|O_EXCL,
  atomic on Lustre and NFSv3+) holding ``{"host", "boot_id", "pid", "start"}`` of its holder, removed on release.
  While it holds the lock the holder touches the file (its mtime) every ``heartbeat_s`` seconds from a thread.

Stale rule (the exclusive-create file outlives a holder killed with kill -9): a waiter removes the file when
- the holder ran on the waiter's host (same host name and boot id) and its pid is gone, or now belongs to a process
  started at another time: at once; or
- the file has not changed (inode, mtime) for ``stale_s`` seconds of the waiter's own monotonic clock: for a holder
  on another host (its pid cannot be asked), or a record still unwritten. Only change is watched, never the
  timestamp's value, so clock skew between hosts does not matter; a waiter that arrives late waits ``stale_s`` from
  its own first look. A holder frozen (SIGSTOP) for longer than ``stale_s`` loses the lock: its heartbeat thread
  notices the file gone or replaced and logs it.
Removing is a rename to a unique name (of several waiters only one rename succeeds), then a check that the renamed
file is the one judged stale; a live lock moved by mistake is linked back.

Waiters never spin: they poll with a backoff from 50 ms to ``max_poll_s``.

Hand-written because no library does all of it: filelock (installed with transformers) raises
NotImplementedError on ENOSYS up to 3.20 and takes ENOLCK / EOPNOTSUPP for a lock held by another (a wait until the
timeout); its later soft fallback reacts to ENOSYS only and recovers a dead holder's file on the same host only.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Optional

HEARTBEAT_S = 10.0         # the holder touches its exclusive-create file this often
STALE_S = 120.0            # unchanged this long (by the waiter's clock): its holder is gone
FIRST_POLL_S = 0.05
MAX_POLL_S = 2.0
# flock's answers for "this file system has no flock", as opposed to "held by another" (EWOULDBLOCK/EAGAIN/EACCES)
FLOCK_REFUSED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
FLOCK_BUSY = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})
log = logging.getLogger("megatron_tsdkd.runtime")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_token(pid: int) -> Optional[str]:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22): tells a reused pid from its holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process() -> dict:
    """The record an exclusive-create holder writes into its lock file."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start": _start_token(pid)}


def describe(record: Optional[dict]) -> str:
    return f"pid {record.get('pid')} on {record.get('host')}" if record else "an unknown process"


class FileLock:
    """``acquire(timeout)`` -> bool, ``release()``; a context manager that waits without limit."""

    def __init__(self, path: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 max_poll_s: float = MAX_POLL_S):
        self.path, self.held_path = path, path + ".held"
        self.heartbeat_s, self.stale_s, self.max_poll_s = heartbeat_s, stale_s, max_poll_s
        self.mode: Optional[str] = None         # "flock" or "exclusive-create", decided on the first try
        self._fd: Optional[int] = None          # flock: the locked descriptor
        self._held: Optional[tuple] = None      # exclusive-create: (st_dev, st_ino) of our file
        self._stop: Optional[threading.Event] = None
        self._seen: Optional[tuple] = None      # a waiter's last look at the holder's file, and since when
        self._seen_since = 0.0

    # -- the two ways --------------------------------------------------------------------------------------------
    def _try_flock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in FLOCK_BUSY:
                return False
            if error.errno in FLOCK_REFUSED and self.mode is None:
                log.info("%s: the file system refuses flock (%s); using an exclusive-create lock file instead",
                         self.path, errno.errorcode.get(error.errno, error.errno))
                self.mode = "exclusive-create"
                return self._try_create()
            raise
        self.mode, self._fd = "flock", fd
        return True

    def _try_create(self) -> bool:
        for _ in range(2):                       # once more right after removing a stale file
            try:
                fd = os.open(self.held_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                if not self._break_if_stale():
                    return False
        else:
            return False
        try:
            os.write(fd, json.dumps(this_process()).encode())
            os.fsync(fd)
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        self._held = (stat.st_dev, stat.st_ino)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop, self._held), daemon=True,
                         name=f"lock-heartbeat {os.path.basename(self.path)}").start()
        return True

    def _heartbeat(self, stop: threading.Event, ours: tuple) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                stat = os.stat(self.held_path)
                if (stat.st_dev, stat.st_ino) != ours:
                    raise FileNotFoundError
                os.utime(self.held_path)
            except FileNotFoundError:
                log.warning("%s: this process's lock was removed by another one that judged it stale (no heartbeat "
                            "for %.0f s); two processes may now hold it", self.held_path, self.stale_s)
                return

    # -- stale locks ---------------------------------------------------------------------------------------------
    def read_holder(self) -> Optional[dict]:
        """The exclusive-create holder's record (None when absent or not yet written)."""
        try:
            with open(self.held_path) as f:
                record = json.loads(f.read() or "null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _look(self) -> Optional[tuple]:
        """(inode, mtime, record) of the holder's file, opened (so NFS revalidates it); None when it is gone."""
        try:
            fd = os.open(self.held_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            stat = os.fstat(fd)
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            record = json.loads(raw or b"null")
        except ValueError:
            record = None
        return (stat.st_dev, stat.st_ino, stat.st_mtime_ns), record if isinstance(record, dict) else None

    def _stale_reason(self, key: tuple, record: Optional[dict]) -> Optional[str]:
        now = time.monotonic()
        if key != self._seen:
            self._seen, self._seen_since = key, now
        if record and record.get("host") == socket.gethostname() and record.get("boot_id") == _boot_id():
            pid = record.get("pid")
            if isinstance(pid, int) and not _pid_alive(pid):
                return f"its holder, {describe(record)}, is gone"
            if isinstance(pid, int) and record.get("start") and _start_token(pid) not in (None, record["start"]):
                return f"its holder, {describe(record)}, is gone (the pid is now another process's)"
        if now - self._seen_since >= self.stale_s:
            return f"unchanged for {now - self._seen_since:.0f} s (no heartbeat from {describe(record)})"
        return None

    def _break_if_stale(self) -> bool:
        """Remove the holder's file if the stale rule says so; True when it is gone (removed, or released)."""
        look = self._look()
        if look is None:
            return True
        key, record = look
        reason = self._stale_reason(key, record)
        if reason is None:
            return False
        aside = f"{self.held_path}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(self.held_path, aside)
        except FileNotFoundError:
            return True                          # released, or another waiter removed it
        stat = os.stat(aside)
        if (stat.st_dev, stat.st_ino, stat.st_mtime_ns) != key:   # a live lock, taken or touched since we looked
            try:
                os.link(aside, self.held_path)
            except FileExistsError:
                log.warning("%s: moved a live lock aside by mistake and another process has taken the lock since; "
                            "two processes may hold it", self.held_path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        log.warning("%s: removed a stale lock: %s", self.held_path, reason)
        self._seen = None
        return True

    # -- the interface -------------------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        if self.locked:
            raise RuntimeError(f"{self.path}: this lock is already held by this object")
        return self._try_create() if self.mode == "exclusive-create" else self._try_flock()

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """Take the lock, polling with backoff for up to ``timeout`` seconds (None: without limit); False on
        timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = FIRST_POLL_S
        while not self.try_acquire():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 1.5, self.max_poll_s)
        return True

    @property
    def locked(self) -> bool:
        return self._fd is not None or self._held is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if self._held is not None:
            ours, self._held = self._held, None
            self._stop.set()
            try:
                stat = os.stat(self.held_path)
                if (stat.st_dev, stat.st_ino) == ours:
                    os.unlink(self.held_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
