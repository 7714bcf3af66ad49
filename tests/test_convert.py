"""HF -> megatron-core distributed checkpoint -> HF reproduces every tensor bit-exactly across TP/PP reshards;
bad input stops early with one sentence naming the culprit.

The ranks run the converter's per-rank functions (or ``main`` inside an existing world) in the shared worker
pool; one conversion goes through ``tools/convert.py`` as a user runs it, spawning its own two ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from harness import run_parallel, run_serial
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB_SIZE, make_tiny_hf_model

from megatron_tsdkd.commands.convert import main
from megatron_tsdkd.models.convert import hf_to_mcore_rank, mcore_to_hf_rank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")
CASES = {"qwen3_tied": ("qwen3", True, torch.float32), "llama3": ("llama", False, torch.float32),
         "qwen2_bf16": ("qwen2", False, torch.bfloat16)}


def read_hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def assert_same_hf_folder(original: str, exported: str) -> None:
    a, b = read_hf_tensors(original), read_hf_tensors(exported)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name} differs after the round trip"
    for name in META_FILES:
        with open(os.path.join(original, name), "rb") as f1, open(os.path.join(exported, name), "rb") as f2:
            assert f1.read() == f2.read(), f"{name} was not carried over unchanged"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("convert_src")
    return {name: make_tiny_hf_model(arch, str(root / name), tie=tie, seed=10 + i, dtype=dtype)
            for i, (name, (arch, tie, dtype)) in enumerate(CASES.items())}


# ---------------------------------------------------------------------------------------------------------------
# Rank functions

def convert_all_to_mcore(sources: dict, out_root: str, tp: int, pp: int) -> None:
    for name, path in sources.items():
        hf_to_mcore_rank(path, os.path.join(out_root, name), tp, pp, CASES[name][2])


def export_all_to_hf(ckpt_root: str, names: list, out_root: str, tp: int, pp: int, via_main: bool = False) -> None:
    for name in names:
        ckpt, out = os.path.join(ckpt_root, name), os.path.join(out_root, name)
        if via_main:  # the CLI inside a world that a launcher already started
            main(["mcore-to-hf", "--mcore", ckpt, "--out", out, "--tp", str(tp), "--pp", str(pp)])
        else:
            mcore_to_hf_rank(ckpt, out, tp, pp, None)


def save_training_style_checkpoint(hf_dir: str, run_root: str) -> None:
    """What the trainer writes: the model beside other state in one checkpoint, a 'latest' marker in the run."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_tsdkd.models import (build_model, copy_hf_meta, load_hf_weights, model_sharded_state_dict,
                                       read_hf_config)

    model = build_model(read_hf_config(hf_dir))
    load_hf_weights(model, hf_dir)
    folder = os.path.join(run_root, "step_000003")
    os.makedirs(folder)
    state = {**model_sharded_state_dict(model), "trainer": {"step": 3, "scheduler": {"lr": 0.1}}}
    dist_checkpointing.save(state, folder)
    copy_hf_meta(hf_dir, os.path.join(folder, "hf_meta"))
    with open(os.path.join(run_root, "latest"), "w") as f:
        f.write("step_000003")
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Round trips

def test_round_trip_tp2_to_tp1_is_bit_exact(tiny_dirs, tmp_path):
    """Saved at TP=2 (vocab padded to 512), loaded at TP=1 (padded to 384): every tensor comes back unchanged.
    The first model goes through tools/convert.py as a user runs it (it spawns 2 ranks) onto a non-empty folder
    with --force."""
    first, rest = "qwen3_tied", {k: v for k, v in tiny_dirs.items() if k != "qwen3_tied"}
    target = tmp_path / "mcore" / first
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    cli = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert.py"), "hf-to-mcore", "--hf",
                          tiny_dirs[first], "--out", str(target), "--tp", "2", "--pp", "1", "--force"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert not (target / "stale.txt").exists()
    assert (target / "hf_meta" / "tokenizer.json").is_file()
    run_parallel(convert_all_to_mcore, rest, str(tmp_path / "mcore"), 2, 1, world_size=2, tp=2, pp=1)
    run_serial(export_all_to_hf, str(tmp_path / "mcore"), list(tiny_dirs), str(tmp_path / "hf"), 1, 1)
    for name, src in tiny_dirs.items():
        assert_same_hf_folder(src, str(tmp_path / "hf" / name))
    config = json.load(open(tmp_path / "hf" / "qwen2_bf16" / "config.json"))
    assert config["dtype"] == "bfloat16"


def test_round_trip_tp1_to_tp2_and_pp2_is_bit_exact_and_loads_in_transformers(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    run_serial(convert_all_to_mcore, tiny_dirs, str(tmp_path / "mcore"), 1, 1)
    names = list(tiny_dirs)
    run_parallel(export_all_to_hf, str(tmp_path / "mcore"), names, str(tmp_path / "hf_tp2"), 2, 1, True,
                 world_size=2, tp=2, pp=1)
    run_parallel(export_all_to_hf, str(tmp_path / "mcore"), names, str(tmp_path / "hf_pp2"), 1, 2,
                 world_size=2, tp=1, pp=2)
    for name, src in tiny_dirs.items():
        assert_same_hf_folder(src, str(tmp_path / "hf_tp2" / name))
        assert_same_hf_folder(src, str(tmp_path / "hf_pp2" / name))
    # PP=2 writes one shard per stage; transformers loads the folder and computes the same logits.
    assert len(set(json.load(open(tmp_path / "hf_pp2" / "llama3" / "model.safetensors.index.json"))[
        "weight_map"].values())) == 2
    ids = torch.randint(0, VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("qwen3_tied", "llama3"):
            before = AutoModelForCausalLM.from_pretrained(tiny_dirs[name]).eval()(ids).logits
            after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_pp2" / name)).eval()(ids).logits
            assert torch.equal(before, after), name


def test_training_checkpoint_exports_from_the_run_folder(tiny_dirs, tmp_path):
    """The model part of a checkpoint that also holds trainer state exports, found through the 'latest' marker."""
    run_root = tmp_path / "run"
    run_root.mkdir()
    run_serial(save_training_style_checkpoint, tiny_dirs["llama3"], str(run_root))
    run_serial(main, ["mcore-to-hf", "--mcore", str(run_root), "--out", str(tmp_path / "hf")])
    assert_same_hf_folder(tiny_dirs["llama3"], str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: main() checks everything before any process starts, so these run in the test process.

def _fails(argv, *fragments):
    with pytest.raises(SystemExit) as error:
        main(argv)
    message = str(error.value)
    assert message.startswith("tsdkd-convert: error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _copy_model(src: str, dst) -> str:
    dst.mkdir()
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f:
            (dst / name).write_bytes(f.read())
    return str(dst)


def test_unsupported_architecture_is_named(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    _fails(["hf-to-mcore", "--hf", str(folder), "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
           "'gpt2'", "GPT2LMHeadModel", "not supported")


def test_layout_that_does_not_divide_is_named(tiny_dirs, tmp_path):
    src = tiny_dirs["llama3"]
    _fails(["hf-to-mcore", "--hf", src, "--out", str(tmp_path / "o"), "--tp", "3", "--pp", "1"],
           "4 attention heads are not divisible by tensor parallel 3")
    _fails(["hf-to-mcore", "--hf", src, "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "3"],
           "2 layers are not divisible by pipeline parallel 3")


def test_truncated_weight_file_is_named(tiny_dirs, tmp_path):
    folder = _copy_model(tiny_dirs["llama3"], tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _fails(["hf-to-mcore", "--hf", folder, "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
           "model.safetensors is truncated")


def test_missing_shard_of_a_sharded_checkpoint_is_named(tiny_dirs, tmp_path):
    folder = _copy_model(tiny_dirs["llama3"], tmp_path / "m")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    save_file({n: tensors[n] for n in shards["model-00001-of-00002.safetensors"]},
              os.path.join(folder, "model-00001-of-00002.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: file for file, members in shards.items() for n in members}}, f)
    _fails(["hf-to-mcore", "--hf", folder, "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
           "model-00002-of-00002.safetensors is missing")


def test_tensor_of_the_wrong_shape_is_named(tiny_dirs, tmp_path):
    folder = _copy_model(tiny_dirs["llama3"], tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path)
    _fails(["hf-to-mcore", "--hf", folder, "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
           "model.layers.1.self_attn.k_proj.weight", "[16, 64]", "[32, 64]")


def test_non_empty_target_is_refused_and_force_never_deletes_the_source(tiny_dirs, tmp_path):
    target = tmp_path / "o"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    _fails(["hf-to-mcore", "--hf", tiny_dirs["llama3"], "--out", str(target), "--tp", "1", "--pp", "1"],
           f"target folder {target} is not empty", "--force")
    assert (target / "keep.txt").read_text() == "mine"
    src = tiny_dirs["llama3"]
    _fails(["hf-to-mcore", "--hf", src, "--out", os.path.dirname(src), "--tp", "1", "--pp", "1", "--force"],
           "would delete the source")


def test_folder_that_is_not_a_checkpoint_is_named(tiny_dirs, tmp_path):
    _fails(["mcore-to-hf", "--mcore", tiny_dirs["llama3"], "--out", str(tmp_path / "o")],
           "is not a megatron-core distributed checkpoint")


def test_export_splits_each_stage_into_files_of_bounded_size():
    from megatron_tsdkd.models.hf_export import _plan

    assert _plan([[("a", 3), ("b", 3), ("c", 3)], [("d", 1)]], max_shard_bytes=6) == [[["a", "b"], ["c"]], [["d"]]]
    assert _plan([[("big", 10)]], max_shard_bytes=6) == [[["big"]]]  # one tensor larger than the bound: alone
