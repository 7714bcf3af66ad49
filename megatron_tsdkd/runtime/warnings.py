"""The one place that filters library warnings: only those a user of this project cannot act on are hidden.

``install()`` is the first thing every command does (``tsdkd-train`` calls it in each torchrun worker, so every
process of a job filters the same way). Each filter below says why its warning is not actionable. A warning that a
user can act on stays visible: a config key we ignore, a tokenizer problem, anything from our own code except the
CPU shim's artefact below, and on GPU megatron-core's notes that Transformer Engine / Apex are missing (installing
them gives fused kernels) or that CUDA_DEVICE_MAX_CONNECTIONS should be 1.

Three kinds of notes: Python warnings (``FILTERS``); log records of libraries that log their notes instead
(``LOG_FILTERS``: vLLM's start-up notes, each a logging.Filter on the logger that emits it); and lines that native
code writes straight to the stderr file descriptor, past Python (``NATIVE_LINES``; only while a library starts,
``native_stderr_filtered``, which captures descriptor 2 and writes back every other line when the block ends).

To see every note (debugging a library), pass any ``-W`` option or set ``PYTHONWARNINGS`` (e.g.
``PYTHONWARNINGS=default``): ``install()`` then leaves the filters as Python set them, adds no log filter, and
``native_stderr_filtered`` captures nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import NamedTuple, Optional


class Filter(NamedTuple):
    message: str          # regular expression matched at the start of the message (case-insensitive)
    category: type
    module: str           # regular expression matched at the start of the module the warning is attributed to
    cpu_only: bool        # hidden on CPU runs only (tests, the CPU demo); shown on GPU
    why: str


FILTERS = (
    # megatron-core's own default TransformerConfig.cuda_graph_scope is "full", which its __post_init__ then reports
    # as deprecated; this project never sets the key, so there is nothing to change.
    Filter(r"full scope is deprecated", UserWarning, r"megatron\.core", False,
           "megatron-core's own default value triggers its deprecation note"),
    # torch 2.13 deprecates these collectives; megatron-core calls them (its DDP gradient buffers, tensor-parallel
    # mappings), this project does not. Only a megatron-core release can change it.
    Filter(r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning,
           r"torch\.distributed", False, "torch deprecations of calls made inside megatron-core"),
    # megatron-core's dist_checkpointing calls torch.distributed.checkpoint's deprecated load_state_dict/save_state_dict
    # (on every resume); only a megatron-core release can change it.
    Filter(r"`(load|save)_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing", False,
           "torch deprecations of calls made inside megatron-core"),
    # megatron-core's distributed optimizer reads .grad of its fp32 shard views (non-leaf tensors) in zero_grad(),
    # every step ("throws grad-access warning", says its own comment). On CPU the shim's TorchFunctionMode forwards
    # that read, so torch attributes the note to the shim; on GPU to megatron-core's optimizer.
    Filter(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
           r"(megatron_tsdkd\.runtime\.cpu_shim|megatron\.core\.optimizer)", False,
           "megatron-core's optimizer reads .grad of non-leaf views by design"),
    # Transformer Engine and Apex are CUDA libraries: on a CPU run there is nothing to install, and megatron-core's
    # fallbacks (torch optimizers, torch norms, local multi-tensor ops) are the CPU path. On GPU the notes stay.
    Filter(r"(Transformer Engine and Apex are|Apex is) not installed", UserWarning, r"megatron", True,
           "CUDA-only libraries on a CPU run"),
    # A CUDA scheduling hint; meaningless without CUDA. On GPU it stays (export CUDA_DEVICE_MAX_CONNECTIONS=1).
    Filter(r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment "
           r"variable CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron\.core", True,
           "a CUDA setting on a CPU run"),
    # megatron-core's dist_checkpointing builds torch ShardedTensors (every checkpoint save, load and conversion);
    # torch deprecates the class. On CPU the shim's TorchFunctionMode forwards the call, so torch attributes the
    # note to the shim. Only a megatron-core release can change it.
    Filter(r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
           r"(megatron_tsdkd\.runtime\.cpu_shim|megatron\.core|torch\.distributed)", False,
           "torch deprecations of classes megatron-core's checkpoints use"),
    # vLLM's kernel dispatcher walks torch.distributed's attributes when it starts, touching the deprecated alias.
    Filter(r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning, r"vllm\.", False,
           "torch deprecations touched inside vLLM"),
)


class LogFilter(NamedTuple):
    logger: str           # the logger that emits the record (vLLM: its module's name)
    message: str          # regular expression searched in the formatted message
    cpu_only: bool
    why: str


LOG_FILTERS = (
    # A CPU replica of the student (tests, the CPU demo) runs vLLM's CPU build eagerly and without Triton, tcmalloc
    # or Intel OpenMP preloaded: performance notes that do not apply to a rollout replica used for tests; on GPU
    # none of them is emitted.
    LogFilter("vllm.v1.worker.cpu_worker", r"is not found in LD_PRELOAD", True, "CPU-build performance hint"),
    LogFilter("vllm.v1.worker.cpu_worker", r"doesn't allow to use `torch.set_num_threads`", True,
              "vLLM's CPU worker replaces torch.set_num_threads for the whole process and notes every call"),
    LogFilter("vllm.triton_utils.importing", r"doesn't include CPU backend", True, "no Triton kernels on CPU"),
    LogFilter("vllm.platforms.cpu", r"(Triton is not installed|Reset SSM cache type)", True,
              "CPU-build notes about kernels and model types this project does not use"),
    LogFilter("vllm.config.vllm", r"(Model Runner V2 requires Triton|Enforce eager set|Inductor compilation was "
              r"disabled)", True, "the eager CPU replica this project asks for (runtime/device_choices.py)"),
    # vLLM's in-place reload (every weight sync of a rollout replica) names each layer that received no weights:
    # the rotary embeddings have none, and a tied output layer's is the embedding's, which
    # generation/vllm_replica.py re-processes itself. Any other layer's note stays.
    LogFilter("vllm.model_executor.model_loader.reload.layerwise",
              r"^\w*(RotaryEmbedding|ParallelLMHead): Failed to load weights", False,
              "layers without weights of their own, handled by the replica"),
)

# Lines native code writes to descriptor 2 while vLLM starts: the CPU build binds its memory to the NUMA node
# (a C++ TORCH_WARN from its OpenMP threads, which torch cannot turn into a Python warning).
NATIVE_LINES = (r"Warning: NUMA binding: Using MEMBIND policy",)


class _Silence(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install(cpu: Optional[bool] = None) -> bool:
    """Hide the warnings in FILTERS (the ``cpu_only`` ones when ``cpu``; default: no CUDA device is visible).
    Returns False, changing nothing, when the user chose warning filters with ``-W`` or ``PYTHONWARNINGS``."""
    if sys.warnoptions:
        return False
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    for f in FILTERS:
        if cpu or not f.cpu_only:
            warnings.filterwarnings("ignore", message=f.message, category=f.category, module=f.module)
    by_logger: dict[str, list[str]] = {}
    for f in LOG_FILTERS:
        if cpu or not f.cpu_only:
            by_logger.setdefault(f.logger, []).append(f.message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Silence)]:
            logger.removeFilter(old)
        logger.addFilter(_Silence(patterns))
    return True


@contextlib.contextmanager
def native_stderr_filtered():
    """Run the block with the stderr file descriptor captured; afterwards write back every line but the known
    harmless ones (``NATIVE_LINES``). Python's own stderr output of the block comes out then too, in order. Nothing
    is captured when the user chose warning filters (``-W``, ``PYTHONWARNINGS``)."""
    if sys.warnoptions:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            harmless = re.compile("|".join(NATIVE_LINES))
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not harmless.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
