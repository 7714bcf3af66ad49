"""Every script in benchmarks/ runs here in its smoke mode (tiny sizes, seconds) and must print its figure lines, so
none rots silently when the code it measures changes (issue 28: length_aware_batches.py once did, replacing a
private method whose signature had changed); and benchmarks reach that code through public names only.
gpu_check.sh, and step_throughput.py which it runs, are covered on their CPU path by tests/test_gpu_check.py.

Imports cost 5-10 s per Python process on 2 shared cores, so the scripts that need no process of their own run in
turn in one child process (each imported by path, its ``main(argv)`` called); the two that start vLLM replicas run
in a second one (vLLM binds the process's OpenMP threads and its shutdown ends the process group, and
rollout_logprob_diff.py keeps its replicas until the process ends). Scripts that start processes of their own
(data_startup.py's ranks, loss_memory.py's variants, teacher_layout_step.py's pair) still do, at their smallest."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
TIMEOUT_S = 300   # generous: the two processes take ~25 s and ~15 s, but the 2 cores are shared with the other lane

N = r"[\d.]+(?:e[-+]\d+)?"   # a finite figure as the scripts print it (inf / nan fail)

# script -> (argv, the lines it must print): the figures each benchmark exists for, and its ratios
IN_ONE_PROCESS = {
    "term_balance_cost.py": (["--smoke"], [
        rf"^  balance none   {N} s$",
        rf"^  balance shares {N} s   ratio {N}x   extra -?{N} s per micro-batch$"]),
    "loss_memory.py": (["--smoke"], [
        *(rf"^{v} +peak growth +{N} GiB \( *{N} x fp32 \[tokens, V\]\)  time +{N} s  loss {N}  \|grad\| {N}$"
          for v in ("chunked", "dense")),
        rf"^peak memory ratio chunked/dense <?= {N} \(1/{N}\); time ratio = {N}; loss rel\. diff = {N}$"]),
    "rollout_kv_cache.py": (["--smoke"], [
        rf"^KV cache: +{N} tokens/s \({N} s\)$", rf"^full re-run: +{N} tokens/s \({N} s\)$", rf"^speed-up: +{N}x$"]),
    "decode_syncs.py": (["--smoke"], [
        r"^greedy outputs of before and after: identical \(4 tokens x 2 rows\)$",
        *(rf"^  {v} +{N} tokens/s  \({N} s\)$" for v in ("before", "after", "old stop check only",
                                                          "old sampler only", "old GQA only")),
        rf"^  after / before: +{N}x$",
        rf"^host read-backs of the stop check per decode: before 4, after 1 \(every 16 tokens\); KV repeat avoided "]),
    "length_aware_batches.py": (["--smoke"], [
        *(rf"^ +{micro} +{N} +{N} +{N} +{N}x$" for micro in (1, 2, 4)),
        *(rf"^  {re.escape(v)} +{N} s/step   padded/real {N}$" for v in ("before", "after", "after+sort")),
        rf"^  speed-up after vs before: {N}x; after\+sort vs before: {N}x$"]),
    "checkpoint_save.py": (["--smoke"], [
        *(rf"^  {mode} +blocking +{N} s   total +{N} s$" for mode in ("sync", "async")),
        rf"^  training blocked: sync / async = {N}x;  async blocks \d+% of its own save;  total async / sync = "
        rf"{N}x$"]),
    "teacher_layout_plan.py": (["--smoke"], [
        rf"^today +co-located TP=4 x PP=2 +2 +\d+ +{N} +{N} +{N}$",
        *(rf"^{name} +student TP=\d+ x PP=\d+, teacher TP=\d+ x PP=\d+ +8 +\d+ +{N} +{N} +{N}$"
          for name in ("chosen", "per node")),
        *(rf"^{name} / today: student replicas {N}x, per-GPU peak {N}x, teacher per GPU {N}x, sequences per forward "
          rf"over the world {N}x$" for name in ("chosen", "per node"))]),
    "moe_teacher_plan.py": (["--smoke"], [
        rf"^  shipped +teacher TP=\d+ x PP=\d+, EP=[2-8] +\d+ +\d+ +{N} +{N} +{N}  fits$",
        rf"^  no EP +teacher TP=\d+ x PP=\d+, EP=1 +\d+ +\d+ +{N} +{N} +-?{N}  (does not )?fit",
        rf"^  shipped / no EP: teacher per GPU {N}x, per-GPU peak {N}x; active / total parameters {N} "]),
    "teacher_layout_step.py": (["--smoke"], [
        *(rf"^{name} +step {N} s  teacher forward {N} s$" for name in ("co-located", "own groups", "own layout")),
        rf"^step time over co-located: own groups {N}x, own layout {N}x$"]),
    "data_startup.py": (["--smoke"], [
        *(rf"^{re.escape(phase)}: slowest rank {N} s, peak RSS \d+ MiB \(per rank: {N} s / \d+ MiB; 64 examples, "
          rf"[\d,]+ tokens\)$" for phase in ("today: JSONL, every rank tokenises into memory (64 rows)",
                                             "parquet, first start (one rank builds the cache)",
                                             "parquet, cached start (memory-mapped)")),
        rf"^ratios vs today: first start {N}x faster, {N}x less peak RSS; cached start {N}x faster, {N}x less "
        r"peak RSS$"]),
}
WITH_VLLM = {   # rollout_logprob_diff.py first: rollout_engines.py's replica shutdown ends the process group
    "rollout_logprob_diff.py": (["--smoke"], [
        *(rf"^tied head_dim 64 +{re.escape(engine)} +fp32 +{N} +{N}$"
          for engine in ("megatron", "vllm", "vllm, sync skipped")),
        rf"^largest healthy difference {N} nats = {N}x rollout\.max_logprob_diff \({N}\); the skipped sync {N} = "
        rf"{N}x$"]),
    "rollout_engines.py": (["--smoke"], [
        *(rf"^{re.escape(engine)} +8 +{N} +{N}$" for engine in ("megatron decode (KV cache)",
                                                               "HF transformers generate")),
        rf"^vLLM \S+ \(VllmReplica\) +8 +{N} +{N}$",
        rf"^rollout engines: tokens/s vLLM {N}, megatron {N}, HF {N}; vLLM / megatron {N}x, vLLM / HF {N}x$",
        rf"^rollout engines: weight sync \(VllmRollouts\.sync after weights_changed\) {N} s mean of 1 "
        rf"\({N}-{N} s; first load {N} s\) = {N}x one vLLM rollout \({N} s\)$"]),
}
ELSEWHERE = {"gpu_check.sh", "step_throughput.py"}   # tests/test_gpu_check.py
FILL_WHEELS = "fill_wheels.sh"                       # test_fill_wheels_check below

# Imports each script by path and calls its main(argv), in turn; a section per script, with how it ended.
RUNNER = r"""
import importlib.util, json, os, sys, time, traceback
for name, argv in json.loads(sys.argv[1]):
    print(f"\n==== {name}", flush=True)
    start, status = time.perf_counter(), "ok"
    try:
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(sys.argv[2], name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    except SystemExit as e:
        status = "ok" if e.code in (None, 0) else f"exit {e.code}"
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        status = "raised"
    print(f"\n==== {name} {status} in {time.perf_counter() - start:.1f} s", flush=True)
sys.stderr.flush()
os._exit(0)   # vLLM replicas kept to the end (rollout_logprob_diff.py) must not be shut down
"""


def _run_in_one_process(scripts: dict) -> dict:
    """Run ``scripts`` in turn in one child process; per script: (status, seconds, its stdout); and under None the
    process's exit status."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    plan = json.dumps([[name, argv] for name, (argv, _) in scripts.items()])
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, plan, BENCH], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:   # the scripts' own processes (data_startup.py's ranks, ...) end with it
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {TIMEOUT_S} s)"
    sections = {}
    for match in re.finditer(r"^==== (\S+)\n(.*?)^==== \1 ([^\n]+) in ([\d.]+) s$", stdout, re.M | re.S):
        sections[match[1]] = (match[3], float(match[4]), match[2])
    for name in scripts:   # a script that never ended (the process died in it) fails with the process's output
        sections.setdefault(name, (f"no end (exit {proc.returncode})", 0.0, stdout[-4000:] + "\n" + stderr[-4000:]))
    sections[None] = proc.returncode
    return sections


@pytest.fixture(scope="module")
def in_one_process():
    return _run_in_one_process(IN_ONE_PROCESS)


@pytest.fixture(scope="module")
def with_vllm():
    return _run_in_one_process(WITH_VLLM)


def _check(sections: dict, scripts: dict, name: str) -> None:
    status, seconds, out = sections[name]
    assert sections[None] == 0, f"the process running {list(scripts)} exited with {sections[None]}"
    assert status == "ok", f"{name} --smoke: {status}\n{out[-6000:]}"
    missing = [pattern for pattern in scripts[name][1] if not re.search(pattern, out, re.M)]
    assert not missing, f"{name} --smoke ({seconds:.1f} s) did not print lines matching {missing}:\n{out[-6000:]}"


@pytest.mark.parametrize("name", list(IN_ONE_PROCESS))
def test_smoke(in_one_process, name):
    _check(in_one_process, IN_ONE_PROCESS, name)


@pytest.mark.parametrize("name", list(WITH_VLLM))
def test_smoke_vllm(with_vllm, name):
    _check(with_vllm, WITH_VLLM, name)


def test_fill_wheels_check(tmp_path):
    """fill_wheels.sh --check (no download): a folder lacking a wheel fails and names it; stand-ins for the named
    wheels pass; a folder over the size limit fails."""
    def check(*extra):
        return subprocess.run(["bash", os.path.join(BENCH, FILL_WHEELS), *extra, "--check", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)

    empty = check()
    assert empty.returncode == 1, empty.stdout + empty.stderr
    wanted = re.search(r"^error: \S+ lacks (.+)$", empty.stderr, re.M)
    assert wanted and "megatron_core-" in wanted[1], empty.stderr
    for pattern in wanted[1].split():
        (tmp_path / pattern.replace("*", "cp312-cp312-manylinux_2_28_x86_64")).write_bytes(b"stand-in")
    ok = check()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.search(r"^total \d+ KiB in \S+ \(the device tool carries at most 64 MiB in all\)$", ok.stdout, re.M)
    assert re.search(r"^ok: 2 wheels \(megatron-core==[\d.]+ packaging==[\d.]+\)", ok.stdout, re.M), ok.stdout
    deepspeed = check("--deepspeed")   # its requirements and the DeepSpeed wheel are not there
    assert deepspeed.returncode == 1 and "deepspeed-" in deepspeed.stderr, deepspeed.stderr
    with open(tmp_path / "stale.whl", "wb") as f:   # sparse: 49 MiB counted, none written
        f.truncate(49 * 2**20)
    big = check()
    assert big.returncode == 1 and "holds more than 48 MiB" in big.stderr, big.stdout + big.stderr


def test_every_benchmark_is_run():
    """A new script in benchmarks/ must join this file (or test_gpu_check.py)."""
    scripts = {f for f in os.listdir(BENCH) if f.endswith((".py", ".sh"))}
    covered = set(IN_ONE_PROCESS) | set(WITH_VLLM) | ELSEWHERE | {FILL_WHEELS}
    assert scripts == covered, f"not run by the suite: {sorted(scripts - covered)}; gone: {sorted(covered - scripts)}"


def test_benchmarks_use_public_names():
    """Benchmarks reach the code they measure through public names only (the step's seams: Trainer.rollout,
    Trainer.batches_of, ...): a private one can change under them unnoticed."""
    found = []
    for name in sorted(f for f in os.listdir(BENCH) if f.endswith(".py")):
        tree = ast.parse(open(os.path.join(BENCH, name)).read())
        for node in ast.walk(tree):
            private = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_tsdkd"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [part for part in node.module.split(".") if part.startswith("_")]
            elif isinstance(node, ast.Import):
                private = [a.name for a in node.names if a.name.startswith("megatron_tsdkd")
                           and any(part.startswith("_") for part in a.name.split("."))]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr == "_exit"):
                    private = [node.attr]
            found += [f"{name}:{node.lineno}: {p}" for p in private]
    assert not found, f"private names used by benchmarks: {found}"
