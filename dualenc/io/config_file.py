"""Typed configs from a YAML file plus ``key=value`` overrides: the one loader behind every dataclass config.

A config is a dataclass whose fields carry their default and help text (:func:`help_field`). Values from YAML
or from the command line are converted to the field's annotated type (:func:`coerce`); an unknown key is an
:class:`InputError` that suggests the closest valid key and lists them all. The training config (sections) and
the SASRec config (one flat mapping) are both built from these pieces.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dualenc.errors import InputError

_NULLS = ("null", "none", "~")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def help_field(default: Any, text: str) -> Any:
    """A dataclass field with a default and the help text ``describe`` prints."""
    return dataclasses.field(default=default, metadata={"help": text})


def choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (for ``__post_init__`` checks)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value > 0`` (or ``>= 0`` with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: ``{}``); ``what`` names its keys in the error."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError("config file not found", path=path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", path=path, line=line) from None
    if not isinstance(loaded, dict):
        raise InputError(f"expected a mapping of {what}", path=path)
    return loaded


def split_override(item: str) -> tuple[str, str]:
    """``"key=value"`` -> ``(key, value)``; the value stays a string until :func:`coerce` reads it."""
    if "=" not in item:
        raise InputError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def unknown_key(key: str, valid: Sequence[str], where: str = "") -> InputError:
    """The error for a key no field has: the closest valid key, then all of them."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"unknown config key {key!r}{hint}; valid keys{where}: {', '.join(sorted(valid))}")


def _from_text(value: str, annotation: Any) -> Any:
    """An override string read as ``annotation`` (bool, int or float), or the string itself if it is not
    one."""
    text = value.strip().lower()
    if annotation is bool:
        return True if text in _TRUE else False if text in _FALSE else value
    try:
        return annotation(value)
    except ValueError:
        return value


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML or an override string) as the field type ``annotation``: bool, int, float, str or
    an optional one (``null``/``none``/``~`` -> None). Anything else is an :class:`InputError` naming
    ``key``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NULLS)):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if annotation not in (bool, int, float, str):
        raise AssertionError(f"unsupported config type {annotation!r} for {key}")
    if isinstance(value, str) and annotation is not str:
        value = _from_text(value, annotation)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, annotation) and not (annotation is not bool and isinstance(value, bool)):
        return value
    raise InputError(f"config key {key!r} expects {annotation.__name__}, got {value!r}")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """``cls(**values)`` with each value coerced to its field's type; ``where`` prefixes keys in errors
    (``"train."``). A ``ValueError`` from the dataclass's own checks becomes an :class:`InputError`."""
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    for key in values:
        if key not in names:
            raise unknown_key(where + key, names, f" in section {where[:-1]!r}" if where else "")
    kwargs = {key: coerce(value, hints[key], where + key) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, InputError) and not where:
            raise
        raise InputError(f"section {where[:-1]!r}: {err}" if where else str(err)) from None


def describe(cls: type, indent: str = "") -> list[str]:
    """One line per field: name, type, default and help text (for ``--help``)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"{indent}{f.name} ({name}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
