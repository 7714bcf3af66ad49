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
from megatron_tsdkd.methods import method_class

CONFIG_FILE = "config.yaml"
HARMLESS = ("logging.", "checkpoint.", "memory.", "data.eval", "data.cache_dir", "models.recompute", "models.student.path",
            "models.student.format",   # on resume the student's weights come from the checkpoint
            "optimizer.overlap_", "optimizer.bucket_size",   # when gradients/weights travel, not their values
            "rollout.stop_check_interval")   # how often decoding looks for the end, not what it decodes


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


def _defaults(current: dict) -> dict:
    """The default config for ``current``'s method: the value a key had before it existed."""
    return to_dict(TrainConfig(method=method_class(current["method"]["name"]).Config()))


def _as_stored(tree: dict) -> dict:
    """``tree`` as a checkpoint's config.yaml gives it back (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(tree, sort_keys=False))


def _flat_pair(stored: dict, current: dict) -> tuple[dict, dict]:
    """Both configs flat. A key the stored config lacks (one added to the framework after the checkpoint was
    written) stands there at its default, so upgrading the framework between a save and its resume changes
    nothing unless a new setting is set away from its default."""
    a, b = flat_config(stored), flat_config(_as_stored(current))
    defaults = flat_config(_as_stored(_defaults(current)))
    a.update({k: defaults[k] for k in b.keys() - a.keys() if k in defaults})
    return a, b


def config_changes(stored: dict, current: dict) -> tuple[list[str], list[str]]:
    """(keys whose change breaks exactness, harmless changed keys), each sorted."""
    a, b = _flat_pair(stored, current)
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
    a, b = _flat_pair(stored, current)
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys)
