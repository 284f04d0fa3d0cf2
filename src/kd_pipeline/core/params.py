"""Parameter dicts (Kedro params, YAML) -> config dataclasses, and the checks of their values.

One message style everywhere: an unknown key is `"<section>: unknown key(s) [...]; allowed keys
are [...]"`, a bad value is `"<section>.<name> must be <rule>, got <value>"`, where `<section>`
is the parameters path (`teacher_logits`, `distill.trainer`, ...).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping

KEY_MESSAGE = "{what}: unknown key(s) {unknown}; allowed keys are {known}"
#: Appended to the message of a number given as a string: YAML 1.1 (kedro, PyYAML) reads `1e-3`
#: without a dot as the string "1e-3".
YAML_NUMBER_HINT = " (write 1.0e-3, not 1e-3: YAML 1.1 reads the latter as a string)"
#: Appended to the message of a boolean given where a number or a name is expected: YAML 1.1
#: reads a bare true/false, yes/no and on/off as booleans (and True == 1 in Python).
YAML_BOOL_HINT = " (YAML reads a bare true/false, yes/no or on/off as a boolean)"


def dataclass_from_params(cls, params: Mapping[str, Any] | None, what: str, message: str = KEY_MESSAGE):
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


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML `true` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(ok: bool, what: str, name: str, rule: str, value: Any, hint: str = "") -> None:
    """Raise `ValueError("<what>.<name> must be <rule>, got <value><hint>")` unless `ok`."""
    if not ok:
        raise ValueError(f"{what}.{name} must be {rule}, got {value!r}{hint}")


def _bool_hint(value: Any) -> str:
    return YAML_BOOL_HINT if isinstance(value, bool) else ""


def require_choice(what: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    ok = value in choices and not (isinstance(value, bool) and not any(c is value for c in choices))
    require(ok, what, name, f"one of {choices}", value, _bool_hint(value))


def require_bool(what: str, name: str, value: Any) -> None:
    require(isinstance(value, bool), what, name, "a bool (true or false)", value)


def require_int(what: str, name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    """An int (not a bool), at least `minimum` when given; None too when `allow_none`."""
    if allow_none and value is None:
        return
    rule = "an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}"
    require(is_int(value) and (minimum is None or value >= minimum), what, name,
            rule + (" or null" if allow_none else ""), value, _bool_hint(value))


def require_number(what: str, name: str, value: Any, minimum: float | None = None,
                   above: float | None = None) -> None:
    """An int or float (not a bool), `>= minimum` / `> above` when given; a string gets the YAML hint."""
    hint = YAML_NUMBER_HINT if isinstance(value, str) else ""
    require(is_number(value), what, name, "a number", value, hint)
    if minimum is not None:
        require(value >= minimum, what, name, f"a number >= {minimum}", value)
    if above is not None:
        require(value > above, what, name, f"a number > {above}", value)
