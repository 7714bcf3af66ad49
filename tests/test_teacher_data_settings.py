"""tools/generate_teacher_data.py records the settings an output was written with and refuses to resume it with
others (it would mix two data sets in one file); the check runs before any process group or model load."""
import json

import pytest

from harness import run_serial
from tiny_models import make_tiny_hf_model


def _teacher_main(argv):
    from megatron_tsdkd.commands.teacher_data import main

    main(argv)


def test_resume_with_other_settings_stops_naming_them(tmp_path):
    model = make_tiny_hf_model("qwen2", str(tmp_path / "qwen2"), seed=3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?"}) + "\n" for i in range(3)))
    output = tmp_path / "teacher.jsonl"
    args = ["--model", model, "--prompts", str(prompts), "--output", str(output), "--max-new-tokens", "4",
            "--seed", "4", "--batch-size", "2"]
    run_serial(_teacher_main, args)
    recorded = json.loads((tmp_path / "teacher.jsonl.settings.json").read_text())
    assert recorded["seed"] == 4 and recorded["sampling"]["max_new_tokens"] == 4
    lines = output.read_text()
    assert len(lines.splitlines()) == 3

    from megatron_tsdkd.commands.teacher_data import main
    with pytest.raises(SystemExit, match=r"--output was written with other settings \(sampling, seed differ"):
        main(args[:-4] + ["--seed", "5", "--batch-size", "2", "--temperature", "0.5"])
    with pytest.raises(SystemExit, match=r"--model .*: .* is not a folder"):
        main(["--model", str(tmp_path / "nowhere"), "--prompts", str(prompts), "--output", str(output)])
    assert output.read_text() == lines  # nothing was appended
    run_serial(_teacher_main, args)     # the same settings resume (here: nothing left to do)
    assert output.read_text() == lines
