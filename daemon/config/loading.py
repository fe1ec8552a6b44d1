"""Reading a config file: YAML (a key given twice refused, aliases bounded), `--set section.key=value`
overrides, and the conversion of the tree into the typed sections, with a `ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import datetime
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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except TooManyValues as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: nested too deeply for a config") from None
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


class TooManyValues(yaml.YAMLError):
    pass


# Far beyond any config a person writes, and small enough that the settings, their flat form and the
# copy every checkpoint keeps stay small: aliases to aliases ("billion laughs") would expand to billions.
MAX_VALUES = 100_000


class ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`, refusing a key given twice in one mapping (YAML parsers silently keep the
    last, so the first setting a person reads would not be the one used) and a document whose aliases
    expand it beyond MAX_VALUES values or into itself, before any of it is constructed."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _count_values(node, {})
        return node

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


def _count_values(node: yaml.Node, counted: dict[int, int]) -> int:
    """The values (scalars and collections) under `node` with every alias expanded; a node an
    alias reaches again is counted once per alias, from `counted` (by node id, -1 while in progress)."""
    known = counted.get(id(node))
    if known == -1:
        raise TooManyValues("an alias inside the collection it names: the value would never end")
    if known is not None:
        return known
    counted[id(node)] = -1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    total = 1 + sum(_count_values(child, counted) for child in children)
    if total > MAX_VALUES:
        raise TooManyValues(f"with its aliases expanded, it holds more than {MAX_VALUES:,} values")
    counted[id(node)] = total
    return total


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"{path}: --set {override!r}: expected section.key=value")
    try:
        value = yaml.load(text, Loader=ConfigLoader)
    except TooManyValues as exc:
        raise ConfigError(f"{path}: --set {override!r}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: --set {override!r}: nested too deeply for a config") from None
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
    if origin is dict:  # task.options, whose content TaskConfig checks with check_options
        if not isinstance(value, dict):
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


# What task.options may hold: what a checkpoint stores under `config` (flat, each mapping's entries
# under dotted names) and a resume compares, exactly as the task was given it.
OPTIONS_HOLD = (
    "task.options takes null, booleans, integers, finite numbers, strings, lists of these and mappings "
    "of names to them (what a checkpoint keeps exactly)"
)
OPTION_SCALARS = (type(None), bool, int, float, str)
# What else a YAML file can make (`!!binary`, `!!set`, `!!omap`, an unquoted date), said as YAML says it.
YAML_KINDS = {
    datetime.date: "a date (quote it for a string)",
    datetime.datetime: "a timestamp (quote it for a string)",
    bytes: "binary data (!!binary)",
    set: "a set (!!set)",
    tuple: "a pair of !!omap or !!pairs",
    list: "a list",
    dict: "a mapping",
}


def check_options(options: dict, key: str) -> None:
    """Raise ConfigError naming the first entry of `options` that a checkpoint would not keep exactly."""
    for name, value in options.items():
        # A checkpoint stores a mapping's entries under dotted names: there "a.b: 1" and "a: {b: 1}"
        # are one setting, and an empty mapping none at all, so a change between them would pass a
        # resume unseen.
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"{key}: {name!r} is not a name (a non-empty string without dots); {OPTIONS_HOLD}")
        where = f"{key}.{name}"
        if isinstance(value, dict):
            if not value:
                raise ConfigError(f"{where}: an empty mapping, which a checkpoint cannot store; {OPTIONS_HOLD}")
            check_options(value, where)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                _check_option_scalar(item, f"{where}[{index}]", f"{_kind(item)} inside a list")
        else:
            _check_option_scalar(value, where, _kind(value))


def _check_option_scalar(value: Any, where: str, kind: str) -> None:
    if not isinstance(value, OPTION_SCALARS):
        raise ConfigError(f"{where}: {kind}; {OPTIONS_HOLD}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number; {OPTIONS_HOLD}")


def _kind(value: Any) -> str:
    return YAML_KINDS.get(type(value), f"a {type(value).__name__}")
