"""Training configuration: sections with help text and units, from YAML plus ``key=value`` overrides.

A YAML file has one mapping per section (``model``, ``data``, ``train``, ``loss``, ...). Every key is unique
across sections, so an override may name it bare (``output_dir=runs/x``) or dotted
(``train.output_dir=runs/x``). An unknown or mistyped key is an error that lists the valid keys. Defaults live
only in the dataclass fields. Flag names follow Tevatron where the meaning is the same (``pooling``,
``normalize``, ``temperature``, ``train_group_size``, ``query_max_len``, ``passage_max_len``,
``untie_encoder``, ``negatives_x_device``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.config_file import (
    build,
    describe,
    field_names,
    read_yaml_mapping,
    split_override,
    unknown_key,
)
from dualenc.losses.sce_config import SCEConfig
from dualenc.negcache.config import CacheConfig
from dualenc.training.config_sections import DataConfig, LossConfig, ModelConfig, TrainConfig

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


def _parse_override(item: str, index: dict[str, str]) -> tuple[str, str, str]:
    key, value = split_override(item)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise InputError(
                f"unknown config section {section!r} in {item!r}; sections: {', '.join(SECTIONS)}"
            )
        if index.get(name) != section:
            raise unknown_key(key, field_names(SECTIONS[section]), f" in section {section!r}")
        return section, name, value
    if key not in index:
        raise unknown_key(key, list(index), "")
    return index[key], key, value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides; validate everything.

    Raises:
        InputError: unknown section or key (with the list of valid keys), wrong type, invalid value.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        loaded = read_yaml_mapping(path, "sections")
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
    sections = {name: build(cls, raw.get(name, {}), f"{name}.") for name, cls in SECTIONS.items()}
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
        lines += [f"[{section}]", *describe(cls, indent="  ")]
    return "\n".join(lines)
