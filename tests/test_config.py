"""Config: YAML + overrides into a typed tree; every user mistake is one line naming the key."""
import pytest

from megatron_tsdkd.config import ConfigError, load_config

BASE = ["models.student.path=s", "models.teacher.path=t", "data.train=d.jsonl"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: gkd\n  beta: 0.5\nparallel: {tensor: 2}\n")
    cfg = load_config(str(path), BASE + ["method.beta=0.25", "optimizer.lr=1e-3", "rollout.greedy=true", "batch.global_size=8"])
    assert cfg.method.name == "gkd" and cfg.method.beta == 0.25 and cfg.parallel.tensor == 2
    assert cfg.rollout.greedy is True and cfg.batch.global_size == 8 and cfg.optimizer.lr == 1e-3
    assert cfg.method.rho == 0.1 and cfg.method.top_k == 10  # METHOD.md defaults


@pytest.mark.parametrize("override, message", [
    ("method.betta=0.5", r"method\.betta: unknown key \(did you mean method\.beta\?\)"),
    ("method.beta=1.5", r"method\.beta: must be within \[0, 1\], got 1\.5"),
    ("method.top_k=ten", r"method\.top_k: expected an integer, got 'ten'"),
    ("method.name=foo", r"method\.name: must be one of sft, kd, gkd, distillm, tsdkd; got 'foo'"),
    ("batch.global_size=10", r"batch\.global_size: 10 is not a multiple of batch\.micro_size \(4\)"),
    ("rollout.greedy=maybe", r"rollout\.greedy: expected true or false"),
    ("nonsense=1", r"nonsense: unknown key"),
    ("method.beta", r"expected key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + ["batch.micro_size=4", "batch.global_size=8", override])


def test_required_and_method_specific_rules(tmp_path):
    with pytest.raises(ConfigError, match="models.teacher.path: is required for method tsdkd"):
        load_config(None, ["models.student.path=s", "data.train=d"])
    with pytest.raises(ConfigError, match="rollout.on_policy_prob: method sft trains on the data set's responses"):
        load_config(None, ["models.student.path=s", "data.train=d", "method.name=sft"])
    cfg = load_config(None, ["models.student.path=s", "data.train=d", "method.name=sft", "rollout.on_policy_prob=0"])
    assert cfg.models.teacher.path == ""


def test_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  beta: [0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(str(tmp_path / "nowhere.yaml"))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method:\n  beta: 2\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: method\.beta: must be within"):
        load_config(str(wrong), BASE)
