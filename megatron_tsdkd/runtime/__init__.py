"""Process groups, device-true collectives on the project's own data, phase timing, the CPU shim, every model
tensor on the rank's device (placement), and the list of decisions that depend on the device (device_choices:
nothing outside runtime/ branches on it)."""
from megatron_tsdkd.runtime import collectives, device_choices
from megatron_tsdkd.runtime.collectives import (all_gather_objects, all_reduce_values, any_true, barrier,
                                                broadcast_object, broadcast_values, gather_objects, group_device,
                                                sum_counts)
from megatron_tsdkd.runtime.distributed import ParallelLayout, destroy, device, init_distributed
from megatron_tsdkd.runtime.placement import assert_placed, place_model
from megatron_tsdkd.runtime.timing import PhaseClock

__all__ = [
    "ParallelLayout", "init_distributed", "destroy", "device",
    "collectives", "device_choices", "group_device", "all_reduce_values", "any_true", "sum_counts",
    "broadcast_object", "broadcast_values", "all_gather_objects", "gather_objects", "barrier",
    "PhaseClock", "place_model", "assert_placed",
]
