"""Config: YAML + overrides into a typed tree; every user mistake is one line naming the key."""
import re

import pytest

from megatron_tsdkd.config import ConfigError, load_config
from megatron_tsdkd.methods import METHODS

BASE = ["models.student.path=s", "models.teacher.path=t", "data.train=d.jsonl"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: gkd\n  beta: 0.5\nparallel: {tensor: 2}\n")
    cfg = load_config(str(path), BASE + ["method.beta=0.25", "optimizer.lr=1e-3", "rollout.greedy=true", "batch.global_size=8"])
    assert cfg.method.name == "gkd" and cfg.method.beta == 0.25 and cfg.parallel.tensor == 2
    assert cfg.rollout.greedy is True and cfg.batch.global_size == 8 and cfg.optimizer.lr == 1e-3
    tsdkd = load_config(None, BASE).method
    assert tsdkd.rho == 0.1 and tsdkd.top_k == 10 and tsdkd.gamma_em == 1.0 and tsdkd.alpha == 0.1  # METHOD.md


@pytest.mark.parametrize("override, message", [
    ("method.betta=0.5", r"method\.betta: unknown key \(did you mean method\.beta\?\)"),
    ("method.beta=1.5", r"method\.beta: must lie in \[0, 1\], got 1\.5"),
    ("method.rho=0", r"method\.rho: must lie in \(0, 1\], got 0\.0"),
    ("method.top_k=0", r"method\.top_k: must be an integer >= 1, got 0"),
    ("method.name=nope", r"method\.name: unknown method 'nope' \(known: " + re.escape(", ".join(sorted(METHODS))) + r"\)"),
    ("method.name=minillm rollout.temperature=0.7", r"rollout: method minillm weighs tokens by the sampling law"),
    ("method.name=skd engine=deepspeed", r"engine: method skd runs on engine=megatron only \(it samples with student"),
    ("method.name=kpod method.prepared_dir=x engine=deepspeed", r"engine: method kpod runs on engine=megatron only"),
    ("method.name=tsdk", r"did you mean tsdkd\?"),
    ("rollout.top_p=0", r"rollout\.top_p: must lie in \(0, 1\], got 0\.0"),
    ("rollout.on_policy_prob=2", r"rollout\.on_policy_prob: must lie in \[0, 1\], got 2\.0"),
    ("rollout.stop_check_interval=0", r"rollout\.stop_check_interval: must be an integer >= 1, got 0"),
    ("method.indirect_level=sequence rollout.num_samples=2 batch.sort_by_length=true",
     r"batch\.sort_by_length: must be false with method\.indirect_level=sequence"),
    ("method.top_k=ten", r"method\.top_k: expected an integer, got 'ten'"),
    ("batch.global_size=10", r"batch\.global_size: 10 is not a multiple of batch\.micro_size \(4\)"),
    ("rollout.greedy=maybe", r"rollout\.greedy: expected true or false"),
    ("nonsense=1", r"nonsense: unknown key"),
    ("method.beta", r"expected key=value"),
    ("parallel.teacher.tensor=0", r"parallel\.teacher\.tensor: must be >= 1, got 0"),
    ("parallel.teacher.tensor=2 engine=deepspeed",
     r"parallel\.teacher\.tensor: is for engine=megatron \(engine=deepspeed partitions the teacher with ZeRO-3"),
    ("parallel.teacher.colocated=false engine=deepspeed", r"parallel\.teacher\.colocated: is for engine=megatron"),
    ("method.name=sft parallel.teacher.tensor=2", r"parallel\.teacher: method sft has no teacher"),
    ("method.name=skd parallel.teacher.pipeline=2",
     r"parallel\.teacher: method skd samples each token from the student's and the teacher's logits together"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + ["batch.micro_size=4", "batch.global_size=8", *override.split()])


def test_required_and_method_specific_rules(tmp_path):
    with pytest.raises(ConfigError, match="models.teacher.path: is required for method tsdkd"):
        load_config(None, ["models.student.path=s", "data.train=d"])
    with pytest.raises(ConfigError, match="rollout.on_policy_prob: method sft trains on the data set's responses"):
        load_config(None, ["models.student.path=s", "data.train=d", "method.name=sft", "rollout.on_policy_prob=0.5"])
    # lambda follows the method unless set: sft and kd need no extra key, tsdkd and gkd default to on-policy
    cfg = load_config(None, ["models.student.path=s", "data.train=d", "method.name=sft"])
    assert cfg.models.teacher.path == "" and cfg.rollout.on_policy_prob == 0.0
    assert load_config(None, BASE + ["method.name=kd"]).rollout.on_policy_prob == 0.0
    assert load_config(None, BASE).rollout.on_policy_prob == 1.0
    assert load_config(None, BASE + ["rollout.on_policy_prob=0.25"]).rollout.on_policy_prob == 0.25


def test_method_section_is_the_methods_own_type(caplog):
    from megatron_tsdkd.methods import method_class, setting_names

    gkd = load_config(None, BASE + ["method.name=gkd", "method.beta=0.3"]).method
    assert isinstance(gkd, method_class("gkd").Config) and gkd.beta == 0.3
    assert "gamma_em" not in setting_names(type(gkd))
    # a tsdkd setting left in a config that switches to gkd is reported and ignored, not silently kept
    with caplog.at_level("WARNING"):
        load_config(None, BASE + ["method.name=gkd", "method.gamma_em=0.01"])
    assert "method.gamma_em ignored: not settings of method gkd" in caplog.text
    with pytest.raises(ConfigError, match=r"method\.gama_em: unknown key \(did you mean method\.gamma_em\?\)"):
        load_config(None, BASE + ["method.gama_em=0.01"])


def test_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  beta: [0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(str(tmp_path / "nowhere.yaml"))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method:\n  beta: 2\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: method\.beta: must lie in"):
        load_config(str(wrong), BASE)


def test_resume_across_an_upgrade_that_added_keys():
    """A checkpoint written before a setting existed resumes: the missing key counts as its default there."""
    import yaml

    from megatron_tsdkd.config import to_dict
    from megatron_tsdkd.planning.run_config import config_changes, config_yaml

    cfg = load_config(None, BASE)
    stored = yaml.safe_load(config_yaml(cfg))
    del stored["logging"]["diagnostics_interval"], stored["rollout"]["temperature"]
    assert config_changes(stored, to_dict(cfg)) == ([], [])
    changed = load_config(None, BASE + ["rollout.temperature=0.5"])
    assert config_changes(stored, to_dict(changed)) == (["rollout.temperature"], [])
