"""The one type rule for options: config keys and method options are checked against the
type of their default."""
from __future__ import annotations


class OptionError(ValueError):
    """An option whose value has the wrong type."""


def check_type(key: str, value, default, error: type[Exception] = OptionError, items: tuple = (str,)):
    """``value`` checked (and coerced: an integral float to ``int``, an ``int`` to ``float``)
    against the type of ``default``; ``None`` on either side passes. A list's entries must be of
    the ``items`` types (strings unless a key says otherwise). The one type rule for config keys
    and method options alike; a mismatch raises ``error`` naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise error(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise error(f"{key} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise error(f"{key} must be a string, got {value!r}")
        return str(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise error(f"{key} must be a mapping, got {value!r}")
        return value
    if isinstance(default, list):
        if isinstance(value, items):  # one item
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, items) for v in value):
            what = "strings (e.g. file paths)" if items == (str,) else " or ".join(
                {str: "strings", dict: "mappings"}.get(t, t.__name__) for t in items)
            raise error(f"{key} must be a list of {what}, got {value!r}")
        return list(value)
    return value
