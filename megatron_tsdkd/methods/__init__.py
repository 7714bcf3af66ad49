"""Distillation methods behind one interface: sft, kd, gkd, distillm, tsdkd."""
from megatron_tsdkd.methods import distillm, gkd, kd, sft, tsdkd  # noqa: F401  (registration)
from megatron_tsdkd.methods.base import METHODS, DistillationMethod, MethodOutput, build_method

__all__ = ["METHODS", "DistillationMethod", "MethodOutput", "build_method"]
