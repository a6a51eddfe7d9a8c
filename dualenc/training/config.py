"""Training configuration: dataclasses with help text and units, loaded from YAML plus ``key=value`` overrides.

A YAML file has one mapping per section (``model``, ``data``, ``train``, ``loss``, ...). Every key is unique across
sections, so an override may name it bare (``output_dir=runs/x``) or dotted (``train.output_dir=runs/x``). An
unknown or mistyped key is an error that lists the valid keys. Defaults live only in the dataclass fields.
Flag names follow Tevatron where the meaning is the same (``pooling``, ``normalize``, ``temperature``,
``train_group_size``, ``query_max_len``, ``passage_max_len``, ``untie_encoder``, ``negatives_x_device``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.training.config_sections import (
    CacheConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    SCEConfig,
    TrainConfig,
)

__all__ = [
    "RunConfig",
    "CacheConfig",
    "SCEConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "save_config",
    "config_to_dict",
    "describe_config",
]


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sce: SCEConfig = field(default_factory=SCEConfig)

    def __post_init__(self) -> None:
        self.loss.validate(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]


def _key_index() -> dict[str, str]:
    """Field name -> section name (asserts names are unique across sections)."""
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"config key {f.name!r} is in both {index[f.name]!r} and {section!r}")
            index[f.name] = section
    return index


def _unknown_key(key: str, valid: Sequence[str], where: str) -> InputError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"unknown config key {key!r}{hint}; valid keys{where}: {', '.join(sorted(valid))}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert ``value`` (from YAML or a ``key=value`` string) to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise AssertionError(f"unsupported config type {annotation!r} for {key}")
    raise InputError(
        f"config key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown_key(f"{section}.{key}", names, f" in section {section!r}")
    kwargs = {key: _coerce(value, hints[key], f"{section}.{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"section {section!r}: {err}") from None


def _parse_override(item: str, index: dict[str, str]) -> tuple[str, str, str]:
    if "=" not in item:
        raise InputError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise InputError(
                f"unknown config section {section!r} in {item!r}; sections: {', '.join(SECTIONS)}"
            )
        if index.get(name) != section:
            names = [f.name for f in dataclasses.fields(SECTIONS[section])]
            raise _unknown_key(key, names, f" in section {section!r}")
        return section, name, value
    if key not in index:
        raise _unknown_key(key, list(index), "")
    return index[key], key, value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides; validate everything.

    Raises:
        InputError: unknown section or key (with the list of valid keys), wrong type, invalid value.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise InputError("config file not found", path=path) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", path=path, line=line) from None
        if not isinstance(loaded, dict):
            raise InputError("expected a mapping of sections", path=path)
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise InputError(
                    f"unknown config section {section!r}; sections: {', '.join(SECTIONS)}", path=path
                )
            if not isinstance(values, dict):
                raise InputError(f"section {section!r} must be a mapping", path=path)
            raw[section] = dict(values)
    index = _key_index()
    for item in overrides:
        section, key, value = _parse_override(item, index)
        raw.setdefault(section, {})[key] = value
    sections = {name: _build_section(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    try:
        return RunConfig(**sections)
    except ValueError as err:
        raise InputError(str(err)) from None


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); ``load_config(path)`` reads it back unchanged."""
    atomic.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_config() -> str:
    """Every key with its section, type, default and help text (for ``--help``)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"  {f.name} ({name}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
