"""Reading a config file: YAML (a key given twice refused), `--set section.key=value` overrides,
and the conversion of the tree into the typed sections, with a `ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from daemon.errors import ConfigError


def read_tree(path: Path, overrides: list[str] | tuple[str, ...]) -> dict:
    """The file's mapping of sections, with the overrides applied (values parsed as YAML)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override, path)
    return raw


class DuplicateKey(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, refusing a key given twice in one mapping: YAML parsers silently keep the
    last, so the first setting a person reads would not be the one used."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first != line:
                raise DuplicateKey(f"key {key!r} appears twice in one mapping, at lines {first} and {line}")
        return super().construct_mapping(node, deep)


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"{path}: --set {override!r}: expected section.key=value")
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError:
        raise ConfigError(f"{path}: --set {override!r}: the value is not valid YAML") from None
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: --set {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key!r}: not a setting name (keys are names, not {type(key).__name__}s)")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in raw:
            raise ConfigError(f"{prefix}{f.name}: required")
    return cls(**{name: _convert(hints[name], raw[name], prefix + name) for name in names if name in raw})


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null")
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, key)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin is dict:  # task.options: any YAML mapping with names as keys
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: must be a mapping of names to values, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is an int in Python; a YAML `true` where a number is meant is a mistake.
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: must be {hint.__name__}, got {value!r}")
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
