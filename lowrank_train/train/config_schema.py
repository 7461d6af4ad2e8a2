"""Typed dataclass trees from plain values: the machinery behind run configs, independent of their sections.

:func:`build_dataclass` checks every key and value of a nested mapping (YAML, ``key=value`` overrides) against a
frozen dataclass's type hints and raises :class:`ConfigError` naming the dotted key and what is allowed.
:func:`load_yaml` is the one YAML reader for configs: safe loading that refuses a key given twice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (unknown key, wrong type, bad value)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice.

    Plain YAML loading keeps the last of two equal keys: an ``optimizer:`` section appended at the end of a recipe
    silently replaced the first one, and a run trained AdamW at lr 1e-3 instead of Q-GaLore (issue 20 item 6).
    The keys are compared on the composed node tree, before construction: ``<<`` merge keys (whose entries an
    explicit key may override) and aliases are left as YAML defines them. The error names the stream (set
    ``loader.name`` to the file path, as :func:`load_yaml` does), the dotted key and both lines.

    Attributes:
        key_prefix: prepended to the dotted keys in messages (``"run.metrics."`` for an override's value).
    """

    key_prefix = ""

    def compose_document(self) -> yaml.Node:
        """The document's node tree, after checking every mapping in it for a repeated key."""
        node = super().compose_document()
        self._check_unique_keys(node, self.key_prefix, set())
        return node

    def _check_unique_keys(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: checked where its anchor was
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_unique_keys(item, f"{prefix.removesuffix('.')}[{index}].", seen)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._key_value(key_node)
            if key is None:
                continue
            if key in first:
                raise ConfigError(
                    f"{self.name}: key '{prefix}{key}' is given twice, at {_position(first[key], key_node)} and "
                    f"{_position(key_node, first[key])}; YAML would silently keep only the second. Keep one of "
                    "them (merge the two sections into one)"
                )
            first[key] = key_node
            self._check_unique_keys(value_node, f"{prefix}{key}.", seen)

    def _key_value(self, key_node: yaml.Node) -> Any:
        # The key as the mapping will hold it (so "1" and 1 differ, "0x10" and 16 do not); None for a merge key
        # or a non-scalar key, which are not compared.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            return None
        build = self.yaml_constructors.get(key_node.tag)
        try:
            return build(self, key_node) if build is not None else key_node.value
        except (yaml.YAMLError, ValueError, TypeError):
            return key_node.value


def _position(node: yaml.Node, other: yaml.Node) -> str:
    # "line 3", or "line 3 column 9" when both keys sit on one line (a flow mapping).
    mark = node.start_mark
    column = f" column {mark.column + 1}" if mark.line == other.start_mark.line else ""
    return f"line {mark.line + 1}{column}"


def load_yaml(text: str, source: str | os.PathLike[str] = "<string>", key_prefix: str = "") -> Any:
    """Safely parse one YAML document, refusing a key that appears twice in a mapping.

    Args:
        text: the YAML text.
        source: where it came from (a file path, an override), named in the errors.
        key_prefix: where the document sits in the config (``"run.metrics."``), for the dotted keys in messages.

    Returns:
        The plain Python value (``None`` for an empty document).

    Raises:
        ConfigError: invalid YAML, or a repeated key (naming the dotted key, both line numbers and ``source``).
    """
    loader = UniqueKeyLoader(text)
    loader.name = str(source)  # YAML's own error marks name it too
    loader.key_prefix = key_prefix
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {error}") from error
    finally:
        loader.dispose()


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optimizer.lr=3e-3", "run.metrics=[jsonl]"]`` -> nested dict; values are parsed as YAML.

    The same key given twice keeps the last value, as command-line flags do (``... run.max_steps=10`` appended to
    a command wins); a mapping value (``optimizer={lr: 1e-3}``) merges into the keys set before it.

    Raises:
        ConfigError: an override without ``=``, with an empty key, or with a value that is not valid YAML.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optimizer.lr=3e-3)")
        value = load_yaml(raw, source=f"override {item!r}", key_prefix=f"{key}.") if raw.strip() else None
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"override {item!r} sets a key under {part!r}, which was given a plain value")
            target = existing
        previous = target.get(parts[-1])
        if isinstance(previous, dict) and isinstance(value, Mapping):
            value = merge_dicts(previous, value)
        target[parts[-1]] = value
    return nested


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: values of ``update`` replace those of ``base``; nested dicts merge."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a nested mapping; nested dataclass fields recurse."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' in {where}; allowed keys: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value if value is not None else {}, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a nested library check: still a config problem
        raise ConfigError(f"{where}: {error}") from error


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; return it in the field's type or raise ConfigError."""
    error = ConfigError(f"{key} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise error
    if hint is type(None):
        if value is None:
            return None
        raise error
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise error
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise error
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise error
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # PyYAML reads "1e-3" (no dot) as a string: accept any string that is a plain number.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise error from None
        else:
            raise error
        # YAML's .inf / .nan pass every range check written as a comparison (nan < 0 is False), so a NaN
        # max_grad_norm silently disabled clipping and lr=.inf died at step 2 (issue 12 item 7): refuse them here.
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise error
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def check_positive(key: str, value: int) -> None:
    """ConfigError naming ``key`` unless ``value`` > 0."""
    if value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value}")


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    """ConfigError naming ``key`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def plain(value: Any) -> Any:
    """Nested dicts, lists and scalars (tuples as lists), for YAML and JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
