"""YAML configs and ``key=value`` overrides, validated against what a command accepts.

The command line is the only place that reads YAML. A config is a flat mapping of a
command's options; method-specific options go under ``options:``. Precedence, lowest
first: built-in defaults < ``--config FILE`` < explicit flags < ``key=value`` overrides.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from dfkd.core.options import OptionError, check_type


class ConfigError(OptionError):
    """A config file or override that names an unknown key or has the wrong type."""


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return data


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


def merge_config(defaults: dict, *layers: dict) -> dict:
    """Merge layers over ``defaults``; keys not in ``defaults`` are an error listing the
    accepted ones. ``options`` mappings are merged key by key."""
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
            merged[key] = check_type(key, value, defaults[key], ConfigError)
    return merged


def write_yaml(path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
