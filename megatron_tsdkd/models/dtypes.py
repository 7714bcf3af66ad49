"""The one table of precision names: config and command-line names, torch dtypes, safetensors' names."""
from __future__ import annotations

import torch

from megatron_tsdkd.runtime.device_choices import default_dtype  # noqa: F401 - the device decides: see there

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = tuple(DTYPES)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
