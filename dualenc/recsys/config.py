"""The SASRec recipe's config: one flat dataclass (defaults + help text), loaded from YAML plus ``key=value``.

Defaults are the SCE paper's SASRec settings (``configs/temporal/*``: maxlen 200, hidden 64, 2 blocks, 1 head,
dropout 0.3, Adam lr 1e-3 with betas (0.9, 0.98), patience 10). An unknown key is an error listing the valid
keys; a value is checked against the field's type and range.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dualenc.errors import InputError

LOSSES = ("ce", "sce", "bce", "gbce", "ce_minus")


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class SASRecConfig:
    """Everything one SASRec run needs."""

    # data and split
    data_path: str = _help(
        "recbole:ml-100k", "interaction file (.inter or CSV/TSV); recbole:<name> = a recbole wheel example"
    )
    data_format: str = _help("auto", "auto | inter | csv (auto: by suffix)")
    delimiter: str | None = _help(None, "CSV/TSV delimiter; null = sniff it from the header")
    min_item_count: int = _help(5, "drop items met by fewer distinct users (0 = keep all)")
    min_user_count: int = _help(20, "then drop users with fewer distinct items (0 = keep all)")
    test_quantile: float = _help(0.95, "global time point = this quantile of all timestamps")
    # model
    maxlen: int = _help(200, "sequence length L: the last L items of a history are used")
    hidden: int = _help(64, "embedding / hidden size D")
    num_blocks: int = _help(2, "transformer blocks")
    num_heads: int = _help(1, "attention heads")
    dropout: float = _help(0.3, "dropout rate (embeddings, attention, feed-forward)")
    # loss
    loss: str = _help("ce", "ce | sce | bce | gbce | ce_minus")
    num_negatives: int = _help(256, "n, negatives per position (bce, gbce) or per sequence (ce_minus)")
    gbce_t: float = _help(0.75, "gBCE calibration t in [0, 1]")
    n_buckets: int | None = _help(None, "SCE n_b; null = int(2 sqrt(N)), N = non-pad positions in the batch")
    bucket_size_x: int | None = _help(None, "SCE b_x, positions per bucket; null = int(2 sqrt(N))")
    bucket_size_y: int = _help(256, "SCE b_y, catalog items per bucket")
    mix: bool = _help(False, "SCE Mix: bucket centres are random combinations of the hidden states")
    # training
    batch_size: int = _help(64, "sequences (users) per step")
    learning_rate: float = _help(1e-3, "Adam learning rate")
    adam_beta2: float = _help(0.98, "Adam beta2 (beta1 = 0.9)")
    max_epochs: int = _help(100, "epoch budget")
    patience: int = _help(10, "stop after this many validations without a better validation NDCG@10")
    eval_every: int = _help(1, "validate every this many epochs")
    eval_batch_size: int = _help(256, "users scored at once when evaluating")
    seed: int = _help(
        1235, "seed of weights, batch order, negatives, SCE centres and dropout (--seeds overrides)"
    )
    num_threads: int | None = _help(None, "torch CPU threads; null = torch's default")
    run_name: str | None = _help(None, "name in tables and JSON; null = the loss")
    output_json: str | None = _help(None, "results JSON; null = outputs/sasrec/<run_name>.json")

    def __post_init__(self) -> None:
        for name in (
            "maxlen",
            "hidden",
            "num_blocks",
            "num_heads",
            "num_negatives",
            "bucket_size_y",
            "batch_size",
            "max_epochs",
            "patience",
            "eval_every",
            "eval_batch_size",
            "n_buckets",
            "bucket_size_x",
            "num_threads",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name}={value} must be >= 1")
        if self.loss not in LOSSES:
            raise InputError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.data_format not in ("auto", "inter", "csv"):
            raise InputError(f"data_format={self.data_format!r} is not one of auto, inter, csv")
        if (
            not 0.0 <= self.dropout < 1.0
            or not 0.0 <= self.gbce_t <= 1.0
            or not 0.0 < self.test_quantile < 1.0
        ):
            raise InputError("need 0 <= dropout < 1, 0 <= gbce_t <= 1 and 0 < test_quantile < 1")
        if self.hidden % self.num_heads:
            raise InputError(f"hidden={self.hidden} must be divisible by num_heads={self.num_heads}")
        if self.learning_rate <= 0 or not 0.0 <= self.adam_beta2 < 1.0:
            raise InputError("need learning_rate > 0 and 0 <= adam_beta2 < 1")

    @property
    def name(self) -> str:
        return self.run_name or self.loss


FIELDS = {f.name: f for f in dataclasses.fields(SASRecConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Check/convert a YAML value or an override string to the type of field ``key``."""
    annotation = typing.get_type_hints(SASRecConfig)[key]
    optional = type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if isinstance(value, str) and base is not str:
        if value.lower() in ("null", "none", "~") and optional:
            return None
        value = yaml.safe_load(value) if base is not float else _to_float(value)
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise InputError(f"config key {key!r} expects {base.__name__}, got {value!r}")


def _to_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _unknown(key: str) -> InputError:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(FIELDS)}")


def load_sasrec_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SASRecConfig:
    """Read a flat YAML mapping (optional) and apply ``key=value`` overrides.

    Raises:
        InputError: missing file, invalid YAML, unknown key (with the valid keys), wrong type or range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise InputError("config file not found", path=path) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise InputError(
                f"invalid YAML: {err}", path=path, line=mark.line + 1 if mark else None
            ) from None
        if not isinstance(loaded, dict):
            raise InputError("expected a mapping of config keys", path=path)
        raw.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        raw[key.strip()] = value
    for key in raw:
        if key not in FIELDS:
            raise _unknown(key)
    return SASRecConfig(**{key: _coerce(key, value) for key, value in raw.items()})


def describe_sasrec_config() -> str:
    """Every key with its default and help text (for ``--help-config``)."""
    return "\n".join(f"  {f.name} (default {f.default!r}): {f.metadata['help']}" for f in FIELDS.values())
