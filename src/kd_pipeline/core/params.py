"""Parameter dicts (Kedro params, YAML) -> config dataclasses, refusing unknown keys by name."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

PARAMETER_MESSAGE = "unknown {what} parameter(s) {unknown}; allowed: {known}"
KEY_MESSAGE = "{what}: unknown key(s) {unknown}; allowed keys are {known}"


def dataclass_from_params(cls, params: Mapping[str, Any] | None, what: str, message: str = PARAMETER_MESSAGE):
    """`cls(**params)`, but a misspelt or misplaced key is an error naming it, never ignored.

    `message` is formatted with `what`, the sorted `unknown` keys and the `known` field names.
    """
    params = dict(params or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(message.format(what=what, unknown=unknown, known=known))
    return cls(**params)


def check_unused_fields(obj, used: set[str], selector: str, what: str) -> None:
    """Refuse fields that the chosen kind/method ignores, so a misplaced setting is not lost."""
    defaults = {f.name: f.default for f in fields(obj)}
    stray = sorted(
        name for name, default in defaults.items()
        if name not in used and name != selector and getattr(obj, name) != default
    )
    if stray:
        raise ValueError(
            f"{what} {selector} {getattr(obj, selector)!r} does not use parameter(s) {stray}; "
            f"it uses {sorted(used) or 'none'}"
        )
