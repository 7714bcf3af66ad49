import functools
import os
import signal
import sys
import warnings

import pytest

# Tests are CPU-only and deterministic; keep every BLAS to one thread so 4 processes share 2 cores politely.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

# Tests press Ctrl-C (SIGINT) on the processes they start, as a terminal would. A suite started in the background of
# a non-interactive shell (`make test &`, a CI runner's background job) inherits SIGINT ignored, and every process it
# starts would too: bash cannot trap a signal ignored at its entry, so the launcher would never see the Ctrl-C.
# Python's own handler here gives the children the default disposition at their exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.lru_cache(maxsize=None)
def _lane(path: str) -> str:
    """The test file's lane: "pools" if it runs code on the harness's worker pools (or says ``# lane: pools``: a
    file that launches one process at a time, moved there to balance the lanes), else "launches"."""
    with open(path) as f:
        text = f.read()
    return "pools" if "from harness import" in text or "\n# lane: pools\n" in text else "launches"


@pytest.hookimpl(optionalhook=True)   # a hook of pytest-xdist, which `make test` installs (the dev extra)
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n 2` (`make test`) runs two lanes side by side, one xdist worker each, every file in collection
    order: the files that use the harness's worker pools, and the files that launch their own processes (torchrun,
    Slurm jobs, bash scripts). So the pools are spawned once and held by one process, as in a serial run; one Slurm
    cluster is up at a time; and the two lanes fill the two cores that a serial run leaves half idle (its CPU time
    is ~1.1x its wall time: much of it is one process importing, or waiting for another). Measured on 2 idle
    cores: 602-637 s against 843 s serially. Splitting by cost instead (the Slurm and preemption tests first, beside
    the pools) was slower, 719 s: those tests launch several processes each and slow down most when they share the
    cores, so they are best left to the end of their lane, where they partly run alone. With the teacher-layout
    tests and benchmarks added the lanes summed 762 s (launches) against 542 s (pools) of test time, and the suite
    took 779 s. tests/test_gpu_check.py (125-140 s, one process at a time) and tests/test_rank_deaths.py (28-39 s)
    now ran in the pools lane: 690-717 s (test_slurm.py alone varies from 216 to 365 s between runs). With the
    mixture-of-experts tests the lanes summed 694 s (pools) and 684 s (launches), 702-710 s of suite and 771 s on a
    clean clone: test_rank_deaths.py went back to the launches lane and test_slurm.py's one-node demo (a part of its
    USR1 demo) was dropped. Other `--dist` modes are left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _lane(str(config.rootpath / nodeid.split("::", 1)[0]))

    return LaneScheduling(config, log)
