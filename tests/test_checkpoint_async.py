"""Checkpoint writes (engines/checkpoint.py) and the modes of every file we write (runtime/atomic_files.py).

An asynchronous save returns while its writers are still held open, ``latest`` moves only when the write is
finalised, the save is spread over the data-parallel ranks (fully parallel), and a run resumed from it at DP=2
(fully parallel load) repeats the losses of an uninterrupted run exactly. The kill -9 in the middle of an
asynchronous write, through torchrun, is in test_preemption.py.

Exports, conversions and checkpoints give their files and folders the modes the umask asks for (0644/0755 under
022, 0640/0750 under 027), even from a source folder whose files are private.
"""
from __future__ import annotations

import glob
import os
import stat
import time

import torch
from harness import run_parallel, run_serial
from test_train import overrides, workdir  # noqa: F401 - the fixture is used below
from tiny_models import make_tiny_hf_model

STEPS = 4


def _config(argv, *extra):
    from megatron_tsdkd.config import load_config

    return load_config(None, [*argv, f"schedule.max_steps={STEPS}", *extra])


def _losses(history) -> list[float]:
    return [h.metrics["loss/total"] for h in history if h.metrics is not None]


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)
    return found


def _files_per_writing_rank(folder: str, prefix: str) -> set[str]:
    """The ranks (``__<rank>_<n>.distcp``) whose files hold tensors whose key starts with ``prefix``."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(folder).read_metadata().storage_data
    return {info.relative_path.split("_")[2] for index, info in storage.items() if index.fqn.startswith(prefix)}


def _async_write_then_exact_resume(argv, root: str) -> dict:
    """DP=2: an uninterrupted run (synchronous saves); a run whose step-2 save is held open in its writers; a run
    resumed from that save (asynchronous saves)."""
    import torch.distributed as dist

    from megatron_tsdkd.runtime.collectives import barrier
    from megatron_tsdkd.engines.checkpoint import HOLD_SAVE_ENV
    from megatron_tsdkd.models.run_folder import latest_checkpoint, verify
    from megatron_tsdkd.engines.trainer import build_trainer

    out = {"full": _losses(build_trainer(_config(argv, f"checkpoint.dir={root}/full", "checkpoint.async_save=false",
                                                 "checkpoint.interval=2")).train())}
    cut = build_trainer(_config(argv, f"checkpoint.dir={root}/cut", "checkpoint.async_save=true"))
    first = [cut.train_step(), cut.train_step()]
    out["first"] = _losses(first)
    hold = f"{root}/hold"
    os.environ[HOLD_SAVE_ENV] = f"2:{hold}"
    try:
        path = cut.save_checkpoint()
    finally:
        del os.environ[HOLD_SAVE_ENV]
    # save_checkpoint returned; this rank's writers are still held before writing anything
    _wait_for(lambda: glob.glob(f"{hold}/held.*"), "held writer")
    barrier()
    out["before_finalise"] = (latest_checkpoint(f"{root}/cut"), os.path.exists(path),
                              os.path.isdir(path + ".partial"))
    cut.finalize_checkpoint(blocking=False)   # the write has not ended: nothing is published
    out["after_poll"] = latest_checkpoint(f"{root}/cut")
    barrier()
    if dist.get_rank() == 0:
        open(f"{hold}/release", "w").close()
    cut.finalize_checkpoint(blocking=True)
    out["after_finalise"] = latest_checkpoint(f"{root}/cut")
    verify(out["after_finalise"])
    out["model_written_by"] = _files_per_writing_rank(out["after_finalise"], "decoder.")
    del cut

    resumed = build_trainer(_config(argv, f"checkpoint.dir={root}/cut", "checkpoint.resume=auto"))
    history = resumed.train()
    out["resumed"], out["resumed_at"] = _losses(history), history[0].step - 1
    out["latest_at_end"] = os.path.basename(latest_checkpoint(f"{root}/cut"))
    return out


def test_async_save_publishes_when_finalised_and_fully_parallel_resume_at_dp2_is_exact(workdir, tmp_path):
    argv = overrides(workdir, "tsdkd", True, ["parallel.tensor=1"])
    (tmp_path / "hold").mkdir()
    ranks = run_parallel(_async_write_then_exact_resume, argv, str(tmp_path), world_size=2, tp=1)
    out = ranks[0]
    assert len(out["full"]) == STEPS, out
    for rank in ranks:
        assert rank["before_finalise"] == (None, False, True), rank   # the save returned mid-write, unpublished
        assert rank["after_poll"] is None, rank
        assert os.path.basename(rank["after_finalise"]) == "step_000002", rank
        assert rank["latest_at_end"] == f"step_{STEPS:06d}", rank
    assert out["model_written_by"] == {"0", "1"}, out   # the replicated weights were split over the DP ranks
    assert out["resumed_at"] == 2, out
    assert out["first"] == out["full"][:2] and out["resumed"] == out["full"][2:], out


# ---------------------------------------------------------------------------------------------------------------
# File modes


def _modes(root: str) -> dict[str, int]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def _write_everything(src: str, out_root: str, mask: int) -> dict[str, dict[str, int]]:
    """Under umask ``mask``: a conversion (HF -> megatron), an export (megatron -> HF), an asynchronous training
    checkpoint, and an HF folder that transformers wrote (as the DeepSpeed engine's export) repaired."""
    from megatron_tsdkd.models import build_model, load_hf_weights, model_sharded_state_dict, read_hf_config
    from megatron_tsdkd.models.convert import hf_to_mcore_rank, mcore_to_hf_rank
    from megatron_tsdkd.runtime.atomic_files import honour_umask
    from megatron_tsdkd.engines.checkpoint import CheckpointWriter

    previous = os.umask(mask)
    try:
        hf_to_mcore_rank(src, f"{out_root}/conversion", 1, 1, torch.float32)
        mcore_to_hf_rank(f"{out_root}/conversion", f"{out_root}/export", 1, 1, None)
        model = build_model(read_hf_config(src))
        load_hf_weights(model, src)
        writer = CheckpointWriter(f"{out_root}/checkpoint", keep_last=1, async_save=True)
        writer.save(1, model_sharded_state_dict(model), hf_meta_src=src, files={"config.yaml": "seed: 1\n"})
        writer.finalize(blocking=True)
        make_tiny_hf_model("llama", f"{out_root}/transformers", tokenizer=False)
        before = _modes(f"{out_root}/transformers")
        honour_umask(f"{out_root}/transformers")
    finally:
        os.umask(previous)
    return {"before_repair": before, **{name: _modes(f"{out_root}/{name}")
                                       for name in ("conversion", "export", "checkpoint", "transformers")}}


def test_exports_conversions_and_checkpoints_honour_the_umask(tmp_path):
    src = make_tiny_hf_model("llama", str(tmp_path / "src"))
    for name in os.listdir(src):   # a private source must not make the copies private
        os.chmod(os.path.join(src, name), 0o600)
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        found = run_serial(_write_everything, src, str(tmp_path / oct(mask)), mask)
        assert 0o600 in found.pop("before_repair").values()   # safetensors' own mode, which the repair replaces
        for kind, modes in found.items():
            assert any(n.endswith((".safetensors", ".distcp")) for n in modes), (kind, modes)
            wrong = {name: oct(mode) for name, mode in modes.items()
                     if mode != (dir_mode if os.path.isdir(tmp_path / oct(mask) / kind / name) else file_mode)}
            assert not wrong, (oct(mask), kind, wrong)
        assert {"latest", "step_000001", "step_000001/hf_meta/tokenizer.json", "step_000001/manifest.json"} <= \
            set(found["checkpoint"]), found["checkpoint"]
