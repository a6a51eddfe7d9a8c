"""The SASRec recipe's config: one flat dataclass (defaults + help text), loaded from YAML plus ``key=value``.

Defaults are the SCE paper's SASRec settings (``configs/temporal/*``: maxlen 200, hidden 64, 2 blocks, 1 head,
dropout 0.3, Adam lr 1e-3 with betas (0.9, 0.98), patience 10). An unknown key is an error listing the valid
keys; a value is checked against the field's type and range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualenc.errors import InputError
from dualenc.io.config_file import build, describe, help_field, read_yaml_mapping, split_override

LOSSES = ("ce", "sce", "bce", "gbce", "ce_minus")


@dataclass
class SASRecConfig:
    """Everything one SASRec run needs."""

    # data and split
    data_path: str = help_field(
        "recbole:ml-100k", "interaction file (.inter or CSV/TSV); recbole:<name> = a recbole wheel example"
    )
    data_format: str = help_field("auto", "auto | inter | csv (auto: by suffix)")
    delimiter: str | None = help_field(None, "CSV/TSV delimiter; null = sniff it from the header")
    min_item_count: int = help_field(5, "drop items met by fewer distinct users (0 = keep all)")
    min_user_count: int = help_field(20, "then drop users with fewer distinct items (0 = keep all)")
    test_quantile: float = help_field(0.95, "global time point = this quantile of all timestamps")
    # model
    maxlen: int = help_field(200, "sequence length L: the last L items of a history are used")
    hidden: int = help_field(64, "embedding / hidden size D")
    num_blocks: int = help_field(2, "transformer blocks")
    num_heads: int = help_field(1, "attention heads")
    dropout: float = help_field(0.3, "dropout rate (embeddings, attention, feed-forward)")
    # loss
    loss: str = help_field("ce", "ce | sce | bce | gbce | ce_minus")
    num_negatives: int = help_field(256, "n, negatives per position (bce, gbce) or per sequence (ce_minus)")
    gbce_t: float = help_field(0.75, "gBCE calibration t in [0, 1]")
    n_buckets: int | None = help_field(
        None, "SCE n_b; null = int(2 sqrt(N)), N = non-pad positions in the batch"
    )
    bucket_size_x: int | None = help_field(None, "SCE b_x, positions per bucket; null = int(2 sqrt(N))")
    bucket_size_y: int = help_field(256, "SCE b_y, catalog items per bucket")
    mix: bool = help_field(False, "SCE Mix: bucket centres are random combinations of the hidden states")
    # training
    batch_size: int = help_field(64, "sequences (users) per step")
    learning_rate: float = help_field(1e-3, "Adam learning rate")
    adam_beta2: float = help_field(0.98, "Adam beta2 (beta1 = 0.9)")
    max_epochs: int = help_field(100, "epoch budget")
    patience: int = help_field(10, "stop after this many validations without a better validation NDCG@10")
    eval_every: int = help_field(1, "validate every this many epochs")
    eval_batch_size: int = help_field(256, "users scored at once when evaluating")
    seed: int = help_field(
        1235, "seed of weights, batch order, negatives, SCE centres and dropout (--seeds overrides)"
    )
    num_threads: int | None = help_field(None, "torch CPU threads; null = torch's default")
    run_name: str | None = help_field(None, "name in tables and JSON; null = the loss")
    output_json: str | None = help_field(None, "results JSON; null = outputs/sasrec/<run_name>.json")

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


def load_sasrec_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SASRecConfig:
    """Read a flat YAML mapping (optional) and apply ``key=value`` overrides.

    Raises:
        InputError: missing file, invalid YAML, unknown key (with the valid keys), wrong type or range.
    """
    raw: dict[str, Any] = {} if path is None else read_yaml_mapping(path, "config keys")
    raw.update(split_override(item) for item in overrides)
    return build(SASRecConfig, raw)


def describe_sasrec_config() -> str:
    """Every key with its type, default and help text (for ``--help-config``)."""
    return "\n".join(describe(SASRecConfig, indent="  "))
