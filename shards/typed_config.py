"""Typed, closed configuration: dataclasses built from dicts/YAML, where unknown keys and wrong types are errors.

One home for defaults (the dataclass); YAML presets and ``key=value`` overrides may only name fields that exist.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from shards.errors import OctjepaError

T = TypeVar("T")


class ConfigError(OctjepaError, ValueError):
    """A configuration key that does not exist or a value of the wrong type; the message names the key."""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, found {type(value).__name__} {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} entries, found {len(value)}: {value!r}")
            items = [_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, f"{where}.{k}"): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {args}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, found {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, found {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, found {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, found {type(value).__name__} {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type[T], mapping: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``mapping``; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping, found {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in mapping.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON/YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _yaml_load(text: str | bytes) -> Any:
    """YAML with exponent floats such as ``3e-4`` read as numbers (PyYAML follows YAML 1.1, which reads a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"""
        ),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place; returns it."""

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _yaml_load(raw)
    return data


def load_yaml(cls: type[T], path: str | None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (None: the dataclass defaults) plus ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        from shards import storage

        try:
            with storage.open_url(path, "rb") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise ConfigError(
                f"config file {path!r} cannot be read: {type(exc).__name__}: {exc.strerror or exc}"
            ) from exc
        import yaml

        try:
            loaded = _yaml_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    # Overrides start from the file's values so a nested override keeps the file's siblings.
    apply_overrides(data, overrides)
    return from_dict(cls, data, where=path or "config")
