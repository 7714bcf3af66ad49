"""Every decision the project takes by looking at the device, in one list (the CPU shim, cpu_shim.py, and the
process-group setup, distributed.py, are the rest of runtime/ that knows the device).

Outside runtime/ no code branches on the device (tests/test_device_true.py scans the package for it), so the CPU
tests run the branch a GPU takes everywhere else. What stays device-dependent is here because its answer must
differ, and each function says why: a precision or kernel that one device lacks, or a fact (memory) that only one
device has. None of them changes what a model computes for given inputs, weights and dtype.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

GIB = 1024 ** 3


def _cuda() -> bool:
    return torch.cuda.is_available()


def default_dtype() -> torch.dtype:
    """bf16 on GPU (tensor cores; what megatron trains in), fp32 on CPU: CPU bf16 matmuls are emulated and slow,
    and the CPU tests compare against fp32 references. Only a default: ``precision.dtype`` / ``dtype=`` win."""
    return torch.bfloat16 if _cuda() else torch.float32


def auto_attention_backend(transformer_engine_available: Callable[[], bool]) -> str:
    """What ``attention_backend='auto'`` means on this machine: Transformer Engine's fused attention where it
    imports (it needs CUDA), else PyTorch SDPA's flash / memory-efficient kernels on GPU; on CPU megatron's local
    kernel, since neither fused kernel exists there and local is the reference the others are tested against.
    ``transformer_engine_available`` is only called on GPU (importing TE on CPU is slow and pointless)."""
    if _cuda():
        return "te" if transformer_engine_available() else "sdpa"
    return "local"


def device_memory_bytes() -> Optional[int]:
    """This rank's accelerator memory, the memory plan's budget (planning/memory_plan.py); None on CPU, where no
    device memory bounds the layout (host memory is not what a GPU job plans for)."""
    if not _cuda():
        return None
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory


def peak_memory() -> str:
    """This process's peak memory as the step line reports it: allocated on its GPU, or its resident set on CPU
    (there is no device allocator to ask)."""
    if _cuda():
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / GIB:.2f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} GiB"  # KiB on Linux


def device_kind() -> str:
    """'GPU' or 'CPU', for the start-up summary: a user reading the log should see where the run ran."""
    return "GPU" if _cuda() else "CPU"


def release_cached_memory() -> None:
    """Return PyTorch's cached free blocks to the GPU: at the training -> rollout boundary, before a vLLM replica
    wakes up and allocates its share beside them (and after it sleeps), so the step's reserved peak does not stay
    reserved while vLLM's pool takes memory (the plan counts static + max(train, rollout), which only holds if
    the training phase's blocks are returned). A no-op where CUDA was never initialised (CPU)."""
    torch.cuda.empty_cache()


def vllm_replica_options(memory_fraction: float, kv_cache_bytes: int) -> dict:
    """The vLLM engine arguments of a rollout replica (generation/vllm_replica.py) that must differ by device.
    GPU: CUDA graphs (the reason to use vLLM), sleep mode (the replica frees its KV cache and weights while the
    teacher and student train), and the KV cache sized as ``memory_fraction`` of the GPU, the share the memory
    plan sets aside. CPU: eager mode (vLLM's CPU backend would compile every shape with inductor: minutes of
    start-up), no sleep mode (its allocator is CUDA's), and a KV cache of ``kv_cache_bytes``, what the step's
    rollouts need: there is no device memory to take a fraction of."""
    if _cuda():
        return {"enforce_eager": False, "enable_sleep_mode": True, "gpu_memory_utilization": memory_fraction}
    return {"enforce_eager": True, "enable_sleep_mode": False, "kv_cache_memory_bytes": int(kv_cache_bytes)}


def vllm_attention_backend() -> str:
    """The vLLM attention backend whose head sizes decide whether a student can roll out on vLLM (``rollout.engine``):
    FlashAttention, vLLM's default on NVIDIA GPUs, or its CPU backend, which has a shorter list (no head_dim 16)."""
    if _cuda():
        return "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
    return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"
