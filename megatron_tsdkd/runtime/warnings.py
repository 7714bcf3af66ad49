"""The one place that filters library warnings: only those a user of this project cannot act on are hidden.

``install()`` is the first thing every command does (``tsdkd-train`` calls it in each torchrun worker, so every
process of a job filters the same way). Each filter below says why its warning is not actionable. A warning that a
user can act on stays visible: a config key we ignore, a tokenizer problem, anything from our own code except the
CPU shim's artefact below, and on GPU megatron-core's notes that Transformer Engine / Apex are missing (installing
them gives fused kernels) or that CUDA_DEVICE_MAX_CONNECTIONS should be 1.

To see every warning (debugging a library), pass any ``-W`` option or set ``PYTHONWARNINGS`` (e.g.
``PYTHONWARNINGS=default``): ``install()`` then leaves the filters as Python set them.
"""
from __future__ import annotations

import sys
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
)


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
    return True
