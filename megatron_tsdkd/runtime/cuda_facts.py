"""What torch itself knows about CUDA on this node, for ``tsdkd-doctor`` (commands/doctor.py): the CUDA version its
build targets, whether it can use a GPU (and torch's own warning when it cannot), NCCL's version and the devices.
Here because it asks torch.cuda, and every such question lives in runtime/ (tests/test_device_true.py)."""
from __future__ import annotations

import warnings


def torch_cuda_facts() -> dict:
    """``{"torch", "cuda_build", "cuda_available", "cuda_warning", "nccl", "devices": [(name, bytes)]}``;
    NCCL and the devices only when CUDA is available (asking initialises nothing else)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    nccl, devices = None, []
    if available:
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (AttributeError, RuntimeError):
            nccl = None
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append((props.name, int(props.total_memory)))
    warning = next((str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message)), None)
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": available,
            "cuda_warning": warning, "nccl": nccl, "devices": devices}
