"""runtime/file_lock.py: one holder at a time across processes, with flock and with flock refused (as Lustre
mounted without ``-o flock`` refuses it: fcntl.flock raising ENOLCK / EOPNOTSUPP / ENOSYS), and recovery from a holder
killed with kill -9: at once on the same host (its pid is gone), after ``stale_s`` without heartbeat from another
host. The child processes load file_lock.py by path (no torch import), so each starts in well under a second."""
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_tsdkd.runtime import file_lock
from megatron_tsdkd.runtime.file_lock import FileLock

MODULE = file_lock.__file__
REFUSALS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

CHILD = r"""
import errno, fcntl, importlib.util, os, socket, sys, threading, time
spec = importlib.util.spec_from_file_location("file_lock", sys.argv[1])
fl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fl)
role, path, refuse, work, host = sys.argv[2:7]
real = fcntl.flock
if refuse == "1":
    def flock(fd, op):
        if op & fcntl.LOCK_UN:
            return real(fd, op)
        raise OSError(errno.ENOLCK, "No locks available")   # what Lustre without -o flock answers
    fcntl.flock = flock
if host:
    socket.gethostname = lambda: host                       # a holder on another node
lock = fl.FileLock(path, heartbeat_s=0.05, stale_s=3600)

def wait_for(name):
    end = time.monotonic() + 120
    while not os.path.exists(os.path.join(work, name)):
        assert time.monotonic() < end, name
        time.sleep(0.01)

if role == "hold":
    assert lock.acquire(timeout=60)
    open(os.path.join(work, "holding"), "w").write(lock.mode)
    if os.path.exists(os.path.join(work, "hang")):
        threading.Event().wait()                           # until killed
    wait_for("release")
    lock.release()
elif role == "count":
    wait_for("go")
    for _ in range(int(sys.argv[7])):
        with lock:
            log = open(os.path.join(work, "log"), "a")
            log.write(f"enter {os.getpid()}\n"); log.flush()
            counter = os.path.join(work, "counter")
            value = int(open(counter).read() or 0) if os.path.exists(counter) else 0
            os.sched_yield()
            open(counter, "w").write(str(value + 1))
            log.write(f"exit {os.getpid()}\n"); log.close()
"""


def _wait_for(predicate, what, deadline_s=60.0):
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _child(tmp_path, role, refuse, host="", *extra):
    return subprocess.Popen([sys.executable, "-c", CHILD, MODULE, role, str(tmp_path / "x.lock"),
                             "1" if refuse else "0", str(tmp_path), host, *map(str, extra)],
                            stderr=subprocess.PIPE, text=True)


def _refuse_flock(monkeypatch, code=errno.ENOLCK):
    real = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_UN:
            return real(fd, op)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", REFUSALS, ids=[errno.errorcode[c] for c in REFUSALS])
def test_refused_flock_falls_back_to_an_exclusive_create_file(tmp_path, monkeypatch, code):
    _refuse_flock(monkeypatch, code)
    path = str(tmp_path / "x.lock")
    first, second = FileLock(path), FileLock(path)
    assert first.acquire(timeout=0) and first.mode == "exclusive-create"
    record = json.loads(open(path + ".held").read())
    assert record["pid"] == os.getpid() and record["host"] == file_lock.socket.gethostname()
    assert not second.acquire(timeout=0.2)          # a live holder (this process): never stale
    first.release()
    assert not os.path.exists(path + ".held")
    assert second.acquire(timeout=0) and second.mode == "exclusive-create"
    second.release()


def test_busy_flock_is_waited_on_and_other_errors_are_raised(tmp_path, monkeypatch):
    path = str(tmp_path / "x.lock")
    holder, waiter = FileLock(path), FileLock(path)
    assert holder.acquire(timeout=0) and holder.mode == "flock"
    assert not waiter.acquire(timeout=0.1) and waiter.mode is None     # EWOULDBLOCK: held, not refused
    holder.release()
    assert waiter.acquire(timeout=0) and waiter.mode == "flock"
    waiter.release()
    _refuse_flock(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        FileLock(path).acquire(timeout=0)


@pytest.mark.parametrize("refuse", [False, True], ids=["flock", "flock-refused"])
def test_one_holder_at_a_time_across_processes(tmp_path, monkeypatch, refuse):
    """A holder in another process keeps this one out until it releases; then two processes incrementing a counter
    file 40 times each under the lock (read, yield, write) lose no update and never overlap."""
    if refuse:
        _refuse_flock(monkeypatch)
    holder = _child(tmp_path, "hold", refuse)
    _wait_for(lambda: (tmp_path / "holding").exists() or holder.poll() is not None, "the holder")
    assert (tmp_path / "holding").read_text() == ("exclusive-create" if refuse else "flock"), holder.stderr.read()
    mine = FileLock(str(tmp_path / "x.lock"))
    assert not mine.acquire(timeout=0.3)
    (tmp_path / "release").touch()
    assert mine.acquire(timeout=60)
    assert holder.wait(timeout=60) == 0, holder.stderr.read()
    mine.release()

    counters = [_child(tmp_path, "count", refuse, "", 40) for _ in range(2)]
    (tmp_path / "go").touch()
    for child in counters:
        assert child.wait(timeout=120) == 0, child.stderr.read()
    assert (tmp_path / "counter").read_text() == "80"
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 160
    for entered, left in zip(lines[0::2], lines[1::2]):          # each "enter" followed by its own "exit"
        assert entered.split()[0] == "enter" and left.split() == ["exit", entered.split()[1]], (entered, left)


def test_a_killed_holder_on_this_host_is_recovered_at_once(tmp_path, monkeypatch, caplog):
    """kill -9 leaves the exclusive-create file; its pid is gone, so a waiter here removes it without waiting for
    the heartbeat rule (stale_s is an hour)."""
    _refuse_flock(monkeypatch)
    (tmp_path / "hang").touch()
    holder = _child(tmp_path, "hold", True)
    _wait_for(lambda: (tmp_path / "holding").exists() or holder.poll() is not None, "the holder")
    waiter = FileLock(str(tmp_path / "x.lock"), stale_s=3600)
    assert not waiter.acquire(timeout=0.2)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert os.path.exists(waiter.held_path)                        # what kill -9 leaves
    with caplog.at_level(logging.WARNING, logger="megatron_tsdkd.runtime"):
        start = time.monotonic()
        assert waiter.acquire(timeout=60)
    assert time.monotonic() - start < 30
    assert f"its holder, pid {holder.pid} on {file_lock.socket.gethostname()}, is gone" in caplog.text
    assert waiter.read_holder()["pid"] == os.getpid()
    waiter.release()
    assert not [n for n in os.listdir(tmp_path) if ".stale-" in n]


def test_a_holder_on_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path, monkeypatch, caplog):
    """A holder recorded on another host cannot be asked about its pid: while it touches its file the lock stays
    held past stale_s; after kill -9 the file stops changing and a waiter takes the lock stale_s later."""
    _refuse_flock(monkeypatch)
    (tmp_path / "hang").touch()
    holder = _child(tmp_path, "hold", True, "other-node")
    _wait_for(lambda: (tmp_path / "holding").exists() or holder.poll() is not None, "the holder")
    waiter = FileLock(str(tmp_path / "x.lock"), stale_s=1.0, max_poll_s=0.05)
    assert waiter.read_holder()["host"] == "other-node"
    assert not waiter.acquire(timeout=2.0)                         # twice stale_s: the heartbeat keeps it alive
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    killed = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="megatron_tsdkd.runtime"):
        assert waiter.acquire(timeout=60)
    assert 0.9 <= time.monotonic() - killed < 30
    assert "no heartbeat from pid" in caplog.text and "on other-node" in caplog.text
    waiter.release()


def test_the_token_cache_builds_once_with_flock_refused(tmp_path, monkeypatch):
    """The cache's behaviour does not depend on the lock's way: built once, reused, no lock file held after."""
    from tiny_models import make_tokenizer

    from megatron_tsdkd.data import load_chat_dataset, token_cache

    _refuse_flock(monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "response": f"{i + 1}"}) + "\n"
                            for i in range(20)))
    tok = make_tokenizer(str(tmp_path / "tok"))
    builds = []
    real = token_cache._build
    monkeypatch.setattr(token_cache, "_build", lambda *a, **k: builds.append(1) or real(*a, **k))
    first = load_chat_dataset(str(data), tok, cache_dir=str(tmp_path / "cache"))
    again = load_chat_dataset(str(data), tok, cache_dir=str(tmp_path / "cache"))
    assert builds == [1] and len(first) == len(again) == 20
    assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".held")]
