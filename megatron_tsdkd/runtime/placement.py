"""Every tensor of a model on this rank's device, by construction.

Why: megatron-core allocates the weights of a model that is to be loaded (``use_cpu_initialization=False``) on
``torch.cuda.current_device()``, but without Apex its local spec builds every norm as a plain ``torch.nn.RMSNorm``
with no device (transformer/torch_norm.py), so the norms land on torch's default device, the host; and a model
built on the host (``use_cpu_initialization=True``) keeps RotaryEmbedding's ``inv_freq`` as a plain tensor
attribute, which ``Module.to`` does not move. ``place_model`` moves parameters, buffers (persistent or not) and
such tensor attributes to ``distributed.device()``, whatever the build flags, then ``assert_placed`` names any
tensor that is elsewhere. models/builder.py places every model it builds and models/source.py checks again after
loading, so no caller places anything.

The CPU proxy (tests/test_placement.py). On a CPU machine the device and torch's default device are both the
host, so a tensor left on the default device looks placed. The proxy makes the two differ as on a GPU: the device
becomes ``meta`` (``runtime.device()`` and ``torch.cuda.current_device()``, which the CPU shim otherwise answers
with "cpu", both return it) while the default device stays the host. Models are built with both initialisation
flags (and placed by the builder), then filled by the Hugging Face loader (meta tensors accept a copy and keep
nothing); a tensor still on the host is one a GPU run would leave on the host.

What the proxy cannot see: tensors made inside forward (masks, position ids, the rotary cache, megatron's global
memory buffer), which only a GPU run places; a literal ``device="cuda"`` at construction, which the shim rewrites
to the host (placement moves it like any other, so only a tensor placement misses would show); values (meta
tensors hold none), hence no megatron distributed-checkpoint load, which needs real storage (that path is checked
on the host: the load copies into the placed tensors and must not replace them); NCCL groups, streams and events
(gloo takes host tensors); memory. Moving to ``meta`` also replaces the moved Parameter objects, dropping the
attributes megatron set on them (a real host -> GPU move keeps them), so the builder marks its tensor-parallel
weights after placing.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter, buffer (persistent or not) and plain tensor attribute of every module
    of ``model``; a tensor shared by several modules once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False),
               *((key, value) for key, value in vars(module).items() if isinstance(value, torch.Tensor))]
        for key, tensor in own:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield dot + key, tensor


def misplaced(model: torch.nn.Module, device: torch.device) -> list[str]:
    """``name (device)`` for each tensor of ``model`` that is not on ``device``."""
    return [f"{name} ({tensor.device})" for name, tensor in model_tensors(model) if tensor.device != device]


def assert_placed(model: torch.nn.Module, device: Optional[torch.device] = None) -> None:
    """Raise RuntimeError naming every tensor of ``model`` not on ``device`` (default: this rank's device)."""
    device = torch.device(device) if device is not None else _device()
    wrong = misplaced(model, device)
    if wrong:
        raise RuntimeError(f"{len(wrong)} tensors of the model are not on {device}: " + ", ".join(wrong))


def place_model(model: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """Move every tensor of ``model`` (see model_tensors) to ``device`` (default: this rank's device), in place;
    tensors already there are not copied. Returns ``model``."""
    device = torch.device(device) if device is not None else _device()
    model.to(device)                       # parameters and buffers
    for module in model.modules():         # plain tensor attributes, which Module.to skips
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(module, key, value.to(device))
    assert_placed(model, device)
    return model


def _device() -> torch.device:
    from megatron_tsdkd.runtime import distributed   # looked up at call time: the proxy replaces it

    return distributed.device()
