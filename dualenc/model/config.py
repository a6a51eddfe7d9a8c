"""``DualEncoderConfig``: how a dual encoder pools, normalizes and tokenizes (flag names follow Tevatron)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from dualenc.errors import InputError
from dualenc.model.options import check_pooling


@dataclass
class DualEncoderConfig:
    """How a dual encoder pools, normalizes and tokenizes. Flag names follow Tevatron."""

    pooling: str = field(
        default="cls", metadata={"help": "token pooling: 'cls' (position 0) or 'mean' (non-pad)"}
    )
    normalize: bool = field(default=False, metadata={"help": "L2-normalize embeddings (unitless flag)"})
    shared: bool = field(default=True, metadata={"help": "one tower for queries and documents (flag)"})
    query_max_len: int = field(default=32, metadata={"help": "query truncation length, in tokens"})
    passage_max_len: int = field(default=128, metadata={"help": "document truncation length, in tokens"})
    query_prefix: str = field(default="", metadata={"help": "text prepended to each query, e.g. 'query: '"})
    passage_prefix: str = field(
        default="", metadata={"help": "text prepended to each document, e.g. 'passage: '"}
    )

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        for name in ("normalize", "shared"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("query_max_len", "passage_max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive number of tokens, got {value!r}")
        for name in ("query_prefix", "passage_prefix"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {getattr(self, name)!r}")


def make_config(values: Mapping[str, Any], path: str | PathLike | None = None) -> DualEncoderConfig:
    """A ``DualEncoderConfig`` from a dict; an unknown key or a bad value is an ``InputError`` at ``path``."""
    known = [f.name for f in dataclasses.fields(DualEncoderConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown config key {unknown[0]!r}; expected one of {', '.join(known)}", path=path)
    try:
        return DualEncoderConfig(**values)
    except InputError as err:
        raise InputError(err.problem, path=path) from err
