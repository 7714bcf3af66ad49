"""Every tensor of every model the project makes is on the rank's device after building and loading, whatever the
build flags (runtime/placement.py, which also says what the CPU proxy used here cannot see).

On CPU the device and torch's default device are both the host, so a tensor left on the default device would pass
unseen. ``device_is_meta`` makes them differ as on a GPU: the device is ``meta``, the default device the host. Before
placement by construction, a loaded model kept megatron's norms (``torch.nn.RMSNorm``, built with no device) on
the host, and a host-built one kept rotary ``inv_freq``; the teacher then failed at its first forward on a GPU.
Every builder of the project goes through models/source.load_model (the scan below keeps it so), so the models
loaded here stand for the student, teacher, eval, export, teacher-data, KPOD and lm-eval models alike.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from harness import run_parallel, run_serial
from tiny_models import make_tiny_hf_model

import megatron_tsdkd
from megatron_tsdkd.runtime.placement import assert_placed, misplaced, model_tensors, place_model

PACKAGE = Path(megatron_tsdkd.__file__).parent
META = torch.device("meta")
CASES = {"qwen2_tied": ("qwen2", True), "qwen3_untied": ("qwen3", False), "qwen3_tied": ("qwen3", True),
         "llama_untied": ("llama", False)}


@contextlib.contextmanager
def device_is_meta():
    """The CPU proxy of a GPU: the rank's device (``runtime.device()``, and ``torch.cuda.current_device()`` where
    megatron asks it) is ``meta``, while torch's default device stays the host."""
    from megatron_tsdkd import runtime
    from megatron_tsdkd.runtime import distributed

    saved = runtime.device, distributed.device, torch.cuda.current_device
    runtime.device = distributed.device = lambda: META
    torch.cuda.current_device = lambda: "meta"
    try:
        # the proxy bites: megatron's explicit device is the device, a tensor made without one is not
        assert torch.empty(1, device=torch.cuda.current_device()).device == META
        assert torch.nn.RMSNorm(4).weight.device != META
        yield
    finally:
        runtime.device, distributed.device, torch.cuda.current_device = saved


@contextlib.contextmanager
def loaders_fill_in_place():
    """Both weight loaders, checked to copy into the tensors the builder placed: a loader that swapped a tensor
    (``param.data = ...``, ``load_state_dict(assign=True)``) could bring it back from the host unseen on CPU."""
    from megatron_tsdkd.models import hf_weights, mcore_checkpoint

    def checked(load):
        def run(model, *args, **kwargs):
            before = {name: (tensor, tensor.data_ptr()) for name, tensor in model_tensors(model)}
            load(model, *args, **kwargs)
            after = dict(model_tensors(model))
            swapped = [name for name, (tensor, ptr) in before.items()
                       if after.get(name) is not tensor or tensor.data_ptr() != ptr]
            assert not swapped, f"{load.__name__} replaced {swapped}"
        return run

    saved = hf_weights.load_hf_weights, mcore_checkpoint.load_mcore_weights
    hf_weights.load_hf_weights, mcore_checkpoint.load_mcore_weights = map(checked, saved)
    try:
        yield
    finally:
        hf_weights.load_hf_weights, mcore_checkpoint.load_mcore_weights = saved


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("placement")
    return {name: make_tiny_hf_model(arch, str(root / name), tie=tie, seed=i, tokenizer=False)
            for i, (name, (arch, tie)) in enumerate(CASES.items())}


# ---------------------------------------------------------------------------------------------------------------
# Rank functions

def misplaced_on_meta(sources: dict) -> dict:
    """'<case> init=<flag>' -> the tensors not on the device after load_model from a Hugging Face folder, under
    the proxy, built to be loaded (the default) and with megatron's host initialisation."""
    from megatron_tsdkd.models.source import load_model, resolve_model_source

    out = {}
    with device_is_meta(), loaders_fill_in_place():
        for name, path in sources.items():
            for init in (False, True):
                model = load_model(resolve_model_source(path), perform_initialization=init)
                out[f"{name} init={init}"] = misplaced(model, META)
    return out


def convert(path: str, out: str) -> None:
    from megatron_tsdkd.models.convert import hf_to_mcore_rank

    hf_to_mcore_rank(path, out, 2, 1, torch.float32)


def misplaced_from_checkpoint(folder: str) -> list[str]:
    """The tensors not on this rank's device after load_model from a megatron checkpoint. Its loader needs real
    storage, so this runs on the real device (the host here): what it adds to the proxy is the in-place check."""
    from megatron_tsdkd.models.source import load_model, resolve_model_source
    from megatron_tsdkd.runtime import device

    with loaders_fill_in_place():
        return misplaced(load_model(resolve_model_source(folder)), device())


# ---------------------------------------------------------------------------------------------------------------
# Tests

class _Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inv_freq = torch.ones(2)                          # a plain attribute, as megatron keeps it
        self.register_buffer("cache", torch.ones(2), persistent=False)


def test_place_model_moves_parameters_buffers_and_tensor_attributes():
    norm = torch.nn.RMSNorm(4)
    model = torch.nn.ModuleDict({"norm": norm, "again": norm, "rotary": _Rotary()})
    names = ["norm.weight (cpu)", "rotary.cache (cpu)", "rotary.inv_freq (cpu)"]
    assert misplaced(model, META) == names          # a shared module's tensors once
    with pytest.raises(RuntimeError, match="3 tensors of the model are not on meta: norm.weight"):
        assert_placed(model, META)
    assert place_model(model, META) is model and misplaced(model, META) == []
    assert model["rotary"].inv_freq.device == META


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_loaded_models_are_on_the_device(hf_dirs, tp, pp):
    """Qwen2/Qwen3 (q/k norms)/Llama, tied and untied, at TP=1, TP=2 and PP=2 (a tied last stage holds its own
    output weight): nothing left on the host under the proxy."""
    results = run_parallel(misplaced_on_meta, hf_dirs, world_size=tp * pp, tp=tp, pp=pp)
    for rank, found in enumerate(results):
        assert set(found) == {f"{name} init={init}" for name in CASES for init in (False, True)}
        wrong = {case: names for case, names in found.items() if names}
        assert not wrong, f"rank {rank}: tensors off the device: {wrong}"


def test_models_loaded_from_a_megatron_checkpoint_are_on_the_device(hf_dirs, tmp_path):
    folder = str(tmp_path / "mcore")
    run_parallel(convert, hf_dirs["qwen3_tied"], folder, world_size=2, tp=2)
    assert run_parallel(misplaced_from_checkpoint, folder, world_size=2, tp=2) == [[], []]
    assert run_serial(misplaced_from_checkpoint, folder) == []


# The one place each kind of model is made; a module elsewhere that made its own would skip placement.
MAKERS = {
    "GPTModel": {"models/builder.py"},
    "build_model": {"models/builder.py", "models/source.py", "models/__init__.py"},
    "load_hf_weights": {"models/hf_weights.py", "models/source.py", "models/__init__.py"},
    "load_mcore_weights": {"models/mcore_checkpoint.py", "models/source.py", "models/__init__.py"},
    # the DeepSpeed engine's Hugging Face models, placed by DeepSpeed or moved to the device there
    "AutoModelForCausalLM": {"engines/deepspeed/settings.py"},
}


def model_makers(source: str) -> set[str]:
    """The names of MAKERS that ``source`` uses (called, referenced or imported; strings and comments aside)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.name.split(".")[-1] if isinstance(node, ast.alias) else None)
        if name in MAKERS:
            found.add(name)
    return found


def test_models_are_made_in_one_place():
    assert model_makers("from x import GPTModel as G\nm = a.build_model(c)\n'load_hf_weights'") == {
        "GPTModel", "build_model"}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        problems += [f"{where}: {name}" for name in sorted(model_makers(path.read_text()))
                     if where not in MAKERS[name]]
    assert problems == [], "load models through models/source.load_model:\n" + "\n".join(problems)
