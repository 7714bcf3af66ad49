"""The resolved config saved with every checkpoint, and the comparison a resumed run makes against it.

A resumed run is exact only if what decides the numbers is unchanged: the models, data, method, rollout, optimizer,
schedule, batch, precision, layout and seed. Changing any of those stops before any process group, with the list
of keys, unless ``checkpoint.allow_config_changes=true`` accepts them (the new values then win, the schedule
included). Keys that only say where to log or save, how often, or what to evaluate are reported and accepted.
"""
from __future__ import annotations

import os
from typing import Optional

import yaml

from megatron_tsdkd.config import TrainConfig, to_dict

CONFIG_FILE = "config.yaml"
HARMLESS = ("logging.", "checkpoint.", "memory.", "data.eval", "models.recompute", "models.student.path",
            "models.student.format")   # on resume the student's weights come from the checkpoint


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored: dict, current: dict) -> tuple[list[str], list[str]]:
    """(keys whose change breaks exactness, harmless changed keys), each sorted."""
    a, b = flat_config(stored), flat_config(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    harmless = [k for k in changed if k.startswith(HARMLESS)]
    return [k for k in changed if k not in harmless], harmless


def stored_config(checkpoint_folder: str) -> Optional[dict]:
    path = os.path.join(checkpoint_folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def describe(keys: list[str], stored: dict, current: dict) -> str:
    a, b = flat_config(stored), flat_config(current)
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys)
