"""Every user-caused error stops before any process group exists, as one sentence naming the culprit; and a resumed
run compares its config with the one stored in the checkpoint."""
import os
import shutil

import pytest

from harness import run_serial
from test_train import overrides, workdir  # noqa: F401,F811  (the fixture)


def _inputs(argv):
    """The inputs' checks and the run plan: every check a launch makes before its first collective."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.planning.run_plan import preflight

    return preflight(load_config(None, argv))


def _preflight_error(argv) -> str:
    from megatron_tsdkd.planning.inputs import PreflightError

    with pytest.raises(PreflightError) as error:
        _inputs(argv)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_weights_paths_and_world_are_checked_first(workdir, tmp_path, monkeypatch):
    argv = overrides(workdir, extra=[f"checkpoint.dir={tmp_path}/ck", f"logging.dir={tmp_path}/tb"])
    # a truncated safetensors file is found before anything is loaded
    broken = tmp_path / "student_broken"
    shutil.copytree(workdir / "student", broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    assert "models.student.path: weight file" in _preflight_error(argv + [f"models.student.path={broken}"])
    assert "is truncated" in _preflight_error(argv + [f"models.student.path={broken}"])
    os.remove(weights)
    assert "has neither model.safetensors" in _preflight_error(argv + [f"models.student.path={broken}"])
    # an output path that is a file
    (tmp_path / "afile").write_text("x")
    assert _preflight_error(argv + [f"checkpoint.dir={tmp_path}/afile"]).startswith(
        f"checkpoint.dir: {tmp_path}/afile is a file, not a folder")
    assert "logging.dir" in _preflight_error(argv + [f"logging.dir={tmp_path}/afile/tb"])
    # evaluation data without answers
    no_answer = tmp_path / "eval.jsonl"
    no_answer.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    assert _preflight_error(argv + [f"data.eval={no_answer}"]) == \
        f"data.eval: {no_answer}:2 has no \"answer\"; every evaluation problem needs one"
    # TP x PP against the processes the launcher started
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _preflight_error(argv + ["parallel.tensor=2"]).startswith(
        "parallel: tensor x pipeline = 2 x 1 = 2 does not divide the 3 processes started")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "batch.global_size: 4 is not a multiple of data-parallel size 2 x batch.micro_size 4" in \
        _preflight_error(argv + ["batch.micro_size=4"])


def _train(argv):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    trainer.train()
    return trainer.step


def test_resume_with_changed_settings_stops_unless_accepted(workdir, tmp_path, caplog):
    argv = overrides(workdir, extra=[f"checkpoint.dir={tmp_path}/ck", "checkpoint.resume=auto", "schedule.max_steps=2"])
    assert run_serial(_train, argv) == 2
    assert (tmp_path / "ck" / "step_000002" / "config.yaml").is_file()
    message = _preflight_error(argv + ["optimizer.lr=5e-4", "schedule.max_steps=4"])
    assert "would not continue that run exactly: optimizer.lr (0.001 -> 0.0005), schedule.max_steps (2 -> 4)" \
        in message and "checkpoint.allow_config_changes=true" in message
    with caplog.at_level("WARNING"):
        _inputs(argv + ["logging.interval=2"])   # harmless: reported, accepted
    assert "do not affect the numbers: logging.interval (1 -> 2)" in caplog.text
    accepted = argv + ["optimizer.lr=5e-4", "schedule.max_steps=4", "checkpoint.allow_config_changes=true"]
    with caplog.at_level("WARNING"):
        _inputs(accepted)
    assert "with changed settings (checkpoint.allow_config_changes): optimizer.lr" in caplog.text
    assert run_serial(_train, accepted) == 4


def test_eval_errors_are_one_line_before_any_model_load(workdir, tmp_path, monkeypatch):
    from megatron_tsdkd.commands.eval import main

    def fails(argv, fragment):
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert str(error.value).startswith("error: ") and "\n" not in str(error.value), error.value
        assert fragment in str(error.value), error.value

    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": 3}\n')
    fails(["--model", str(workdir / "student"), "--data", str(data)], f"--data: {data}:2:")
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    fails(["--model", str(workdir / "student"), "--data", str(data)], f"{data}:2 has no \"answer\"")
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    fails(["--model", str(tmp_path / "nowhere"), "--data", str(data)], "is not a folder")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fails(["--model", str(workdir / "student"), "--data", str(data), "--tp", "2"],
          "--tp 2 x --pp 1 needs a multiple of 2 processes, 1 started")


def test_an_optimizer_our_checkpoints_do_not_handle_is_refused_and_auto_micro_size_resolved(workdir, tmp_path,
                                                                                          monkeypatch):
    """Transformer Engine (or Apex) installed: megatron-core would build its FusedAdam, whose per-group step our
    checkpoints lose; the job refuses in one line naming what to do. batch.micro_size=auto is written back as the
    plan's choice, which divides a rank's share of the batch."""
    import megatron.core.optimizer as megatron_optimizer

    argv = overrides(workdir, extra=[f"checkpoint.dir={tmp_path}/ck", f"logging.dir={tmp_path}/tb"])

    class FusedAdam:
        pass

    FusedAdam.__module__ = "transformer_engine.pytorch.optimizers"
    with monkeypatch.context() as patched:
        patched.setattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False, raising=False)
        patched.setattr(megatron_optimizer, "Adam", FusedAdam)
        message = _preflight_error(argv)
    assert message.startswith("optimizer: megatron-core would build transformer_engine.pytorch.optimizers.FusedAdam "
                               "(Transformer Engine or Apex is installed)"), message
    assert "pip uninstall transformer-engine apex" in message
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.planning.run_plan import preflight

    cfg = load_config(None, argv + ["batch.micro_size=auto"])
    _, plan = preflight(cfg)
    assert plan.micro_size == plan.memory.inputs.micro_batch == cfg.batch.global_size   # tiny: all fit
    assert cfg.batch.micro_size == "auto"   # the config is never changed; the plan holds the resolved size
