"""YAML configs and ``key=value`` overrides, validated against what a command accepts.

The command line is the only place that reads YAML. A config is a flat mapping of a
command's options; method-specific options go under ``options:``. Precedence, lowest
first: built-in defaults < ``--config FILE`` < explicit flags < ``key=value`` overrides.
"""
from __future__ import annotations

import yaml

from dfkd.core.options import OptionError, check_type
from teachers.files import load_yaml  # noqa: F401  (config files are read through the bounded loader)


class ConfigError(OptionError):
    """A config file or override that names an unknown key or has the wrong type."""


def parse_value(text: str):
    """Parse an override's value with YAML rules (``3`` -> int, ``1e-3`` -> float,
    ``true`` -> bool, ``[1,2]`` -> list); anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads "1e-3" as a string (YAML 1.1)
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str]) -> dict:
    """``["steps=100", "options.lr=0.1"]`` -> ``{"steps": 100, "options": {"lr": 0.1}}``."""
    result: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = parse_value(text)
        if key.startswith("options."):
            result.setdefault("options", {})[key.split(".", 1)[1]] = value
        else:
            result[key] = value
    return result


def merge_config(defaults: dict, *layers: dict, item_types: dict | None = None) -> dict:
    """Merge layers over ``defaults``; keys not in ``defaults`` are an error listing the
    accepted ones. ``options`` mappings are merged key by key. ``item_types`` maps a list key
    to the types its entries may have (strings where it is silent)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in defaults:
                raise ConfigError(f"unknown config key {key!r}; accepted keys: {', '.join(sorted(defaults))}")
            if value is None:
                continue
            if key == "options" and isinstance(value, dict):
                merged["options"] = {**merged.get("options", {}), **{k.replace("-", "_"): v for k, v in value.items()}}
                continue
            merged[key] = check_type(key, value, defaults[key], ConfigError, items=(item_types or {}).get(key, (str,)))
    return merged
