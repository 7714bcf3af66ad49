"""Process groups and the CPU shim."""
from megatron_tsdkd.runtime.distributed import ParallelLayout, destroy, device, init_distributed

__all__ = ["ParallelLayout", "init_distributed", "destroy", "device"]
