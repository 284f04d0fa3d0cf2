"""Parameter dicts (Kedro params, YAML) -> config dataclasses, refusing unknown keys by name."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping


def dataclass_from_params(cls, params: Mapping[str, Any] | None, what: str):
    """`cls(**params)`, but a misspelt or misplaced key is an error naming it, never ignored."""
    params = dict(params or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; allowed: {known}")
    return cls(**params)
