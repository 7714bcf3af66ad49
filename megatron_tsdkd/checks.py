"""The one way a typed setting rejects a bad value: ``ValueError("<field>: <requirement>, got <value>")``.

Typed configs (the config tree's sections, each method's settings, the loss settings) validate themselves in
``__post_init__`` with ``require``; ``config.load_config`` prefixes the section, so the user reads one line naming
the full key, e.g. ``method.rho: must lie in (0, 1], got 0.0``.
"""
from __future__ import annotations


def require(ok: bool, field: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {requirement}, got {value!r}")


def require_flags(obj, *names: str) -> None:
    for name in names:
        require(isinstance(getattr(obj, name), bool), name, getattr(obj, name), "must be true or false")
