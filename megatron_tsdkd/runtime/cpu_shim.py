"""Let megatron-core run on a machine without CUDA (tests, the CPU demo).

megatron-core assumes a CUDA device in a handful of places (PLATFORM.md lists them): the model-parallel RNG
tracker, ``torch.cuda.current_device()`` as a device argument, ``device="cuda"`` in factory calls,
``torch.cuda.synchronize``/streams in p2p communication, and a ``torch.cuda.FloatTensor`` type check in
gradient clipping. No installable library bridges this, so this module does it by hand, and it is the ONLY
place in the project that patches megatron-core or torch.cuda. ``apply()`` is a no-op when CUDA is present.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device='cuda'`` (keyword or ``.to('cuda')``) to the CPU, and makes ``Tensor.type()``
    report CPU float tensors as CUDA ones (megatron's clip_grads asserts on that string)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream: everything on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def wait_event(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _redirected(backward):
    def run(ctx, *args):
        with _CudaToCpu():
            return backward(ctx, *args)

    return staticmethod(run)


def _split_sizes_as_on_gpu() -> None:
    """MoE all-to-all split sizes (and their copy stream) as a GPU has them. megatron-core's alltoall dispatcher copies its split sizes
    from the device to numpy arrays, but only tensors that are ``is_cuda`` (moe_utils.py:1093-1096): on the host
    they stay tensors, which torch's all_to_all_single refuses as split sizes. Here every such host tensor becomes
    the numpy array a GPU run hands on."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    to_host = moe_utils.maybe_move_tensor_to_cpu

    def as_on_gpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = as_on_gpu
    # The dispatcher's copy stream, made once per process from torch.cuda.Stream (token_dispatcher.py:444-445):
    # ours, whose events synchronise, even where vLLM's CPU worker later swaps in a stream whose record_event
    # returns None (vllm/v1/worker/cpu/shm.py).
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NullStream()


def apply() -> bool:
    """Install the redirections once, if and only if no CUDA device is present. Returns whether it did."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as mcore_random

    # The model-parallel RNG tracker keeps "CUDA" generator states; on CPU they are the CPU generator's.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker forks the (here: shared) generator and then warns that the CPU state moved: expected on CPU.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )

    # Autograd runs Function.backward outside the mode below; activation recompute re-runs forward code (with its
    # device="cuda" masks) inside CheckpointFunction.backward, so the redirection is entered there too.
    for function in (mcore_random.CheckpointFunction, mcore_random.CheckpointWithoutOutputFunction):
        function.backward = _redirected(function.backward)

    _split_sizes_as_on_gpu()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
