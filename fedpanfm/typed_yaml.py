"""YAML into checked dataclasses: the loader behind every config file of the project.

A dataclass field declared with :func:`option` carries an inclusive range and a description;
:func:`build_dataclass` checks a plain mapping against the class's annotations (types,
``Literal`` choices, ranges, unknown keys) and raises :class:`ConfigError` naming the source and
the dotted key. Nested dataclasses and dicts of dataclasses merge into their defaults key by
key, so a file names only what it changes. ``fedpanfm/config.py`` (the experiment) and the
deployment configs (``sites/site_config.py``, ``orchestration/coordinator.py``) use it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the file and the dotted key."""


def option(default: Any, *, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an inclusive range check (``lo`` / ``hi``) and a description.

    A list or dict default is copied for each instance (``default_factory``).
    """
    meta = {"min": lo, "max": hi, "doc": doc}
    if isinstance(default, (list, dict)):
        def copy() -> Any:
            return type(default)(default)

        return field(default_factory=copy, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, src: str, meta: dict[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{src}: {key}"
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(typing.cast(type, tp), value, key, src)
    if origin is Literal:
        # Same type too: 1 == True, but "bf16: 1" is not the boolean the key takes.
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key, src, meta)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", src, meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1], f"{key}.{k}", src, meta) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        _range(value, key, src, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        _range(float(value), key, src, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _range(value: float, key: str, src: str, meta: dict[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{src}: {key} = {value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{src}: {key} = {value} is above the maximum {hi}")


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str, src: str) -> Any:
    """An instance of ``cls`` from ``raw`` (keys under ``prefix``), every value checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{src}: unknown key {key!r} (known: {', '.join(fields)})")
    base = cls()
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _merge_default(getattr(base, name), raw[name], hints[name], key, src, dict(f.metadata))
        else:
            kwargs[name] = getattr(base, name)
    return cls(**kwargs)


def _merge_default(default: Any, value: Any, tp: Any, key: str, src: str, meta: dict[str, Any]) -> Any:
    """Nested dataclasses and dicts of dataclasses merge into their defaults, key by key."""
    if dataclasses.is_dataclass(default) and isinstance(value, dict):
        merged = {**_shallow(default), **value}
        return _convert(merged, tp, key, src, meta)
    if typing.get_origin(tp) is dict and isinstance(value, dict) and isinstance(default, dict):
        val_tp = typing.get_args(tp)[1]
        out = dict(default)
        for k, v in value.items():
            sub = f"{key}.{k}"
            if dataclasses.is_dataclass(val_tp) and k in default and isinstance(v, dict):
                out[str(k)] = _convert({**_shallow(default[k]), **v}, val_tp, sub, src, meta)
            else:
                out[str(k)] = _convert(v, val_tp, sub, src, meta)
        return out
    return _convert(value, tp, key, src, meta)


def _shallow(obj: Any) -> dict[str, Any]:
    return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def to_plain(v: Any) -> Any:
    """Dataclasses (nested in dicts too) as plain dicts."""
    if dataclasses.is_dataclass(v):
        return _shallow(v)
    if isinstance(v, dict):
        return {k: to_plain(x) for k, x in v.items()}
    return v


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.depth=4"`` -> (["model", "depth"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set model.depth=4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {text}: empty part in key {key!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _YAML11_FLOAT_GAP.fullmatch(value.strip()):
        # YAML 1.1 reads 1e-4 (no dot) as a string; every user means the number.
        value = float(value)
    return parts, value


_YAML11_FLOAT_GAP = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def apply_override(raw: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set ``raw[parts[0]][parts[1]]... = value`` (``text``, the ``--set`` item, names errors)."""
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file, bad YAML or a non-mapping is a
    :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_yaml_dataclass(cls: type[T], path: str | Path) -> T:
    """Load a YAML file into the dataclass ``cls`` with the checks experiment configs get.

    Used for the deployment configs (coordinator, site kit): unknown keys, wrong types and
    out-of-range values raise :class:`ConfigError` naming the file and the dotted key.

    Args:
        cls: a dataclass whose fields all have defaults (declared with :func:`option`).
        path: the YAML file.
    """
    return typing.cast(T, build_dataclass(cls, read_yaml_mapping(path), "", str(path)))


__all__ = [
    "ConfigError",
    "apply_override",
    "build_dataclass",
    "load_yaml_dataclass",
    "option",
    "parse_override",
    "read_yaml_mapping",
    "to_plain",
]
