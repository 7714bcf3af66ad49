"""Distillation methods behind one interface and one registry: sft, kd, gkd, distillm, minillm, skd, tsdkd, kpod."""
from megatron_tsdkd.methods import distillm, gkd, kd, kpod, minillm, sft, skd, tsdkd  # noqa: F401  (registration)
from megatron_tsdkd.methods.base import (DEFAULT_METHOD, METHODS, DistillationMethod, LossContext, MethodConfig,
                                         MethodOutput, build_method, method_class, setting_names)

__all__ = ["DEFAULT_METHOD", "METHODS", "DistillationMethod", "LossContext", "MethodConfig", "MethodOutput",
           "build_method", "method_class", "setting_names"]
