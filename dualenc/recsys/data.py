"""Interaction logs for sequential recommendation: readers, the SCE paper's temporal split, sequence batches.

Formats (chosen by :func:`read_interactions` from the suffix, or forced with ``fmt``):

- **RecBole atomic** (``.inter``): tab-separated, typed header ``name:type`` (``user_id:token
  item_id:token rating:float timestamp:float``); the columns ``user_id``, ``item_id`` and ``timestamp`` are
  required, others are ignored. MovieLens-100k ships in this format inside the ``recbole`` wheel
  (:func:`recbole_example_path`).
- **CSV/TSV** (anything else): a header row is required, naming a user column (``user``, ``user_id`` or
  ``userid``), an item column (``item``, ``item_id``, ``itemid``) and ``timestamp`` (case-insensitive). The
  delimiter is sniffed from the header (``,``, tab, ``;``, ``|``) unless given. Amazon, Gowalla or the
  official SCE code's ``userid,itemid,timestamp`` CSVs load as they are.

Every row is one interaction (ratings are ignored). Ids stay strings; items are numbered 1..C by sorted id,
0 is padding. Blank lines are skipped but counted, so an error names the physical 1-based line.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dualenc.errors import InputError

PAD = 0
_COLUMNS = {
    "user": ("user", "user_id", "userid"),
    "item": ("item", "item_id", "itemid"),
    "time": ("timestamp",),
}


@dataclass
class Interactions:
    """An interaction log in file order: ``users[k]`` met ``items[k]`` at ``timestamps[k]``."""

    users: np.ndarray  # (M,) str
    items: np.ndarray  # (M,) str
    timestamps: np.ndarray  # (M,) float64


def recbole_example_path(name: str = "ml-100k") -> Path:
    """Path of an example ``.inter`` file of the ``recbole`` wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"dataset {name!r} needs the recbole wheel: pip install --no-deps recbole==1.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name / f"{name}.inter"
    if not path.is_file():
        raise InputError(f"the recbole wheel has no example dataset {name!r}", path=path)
    return path


def _column(header: list[str], role: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in _COLUMNS[role]:
        if name in lowered:
            return lowered.index(name)
    raise InputError(
        f"missing required column {' or '.join(_COLUMNS[role])!r}; header: {header}", path=path, line=1
    )


def read_interactions(path: str | Path, *, fmt: str = "auto", delimiter: str | None = None) -> Interactions:
    """Read a RecBole atomic ``.inter`` file or a CSV/TSV with a header into :class:`Interactions`.

    Args:
        path: the file.
        fmt: ``"inter"``, ``"csv"`` or ``"auto"`` (``.inter`` suffix = atomic, anything else = CSV/TSV).
        delimiter: CSV/TSV only; None = sniff it from the header line.

    Raises:
        InputError: empty file, no rows, untyped atomic header, missing required column, wrong column count,
            empty id, or a timestamp that is not a finite number (each with file and line).
    """
    path = Path(path)
    if fmt not in ("auto", "inter", "csv"):
        raise InputError(f"fmt={fmt!r} is not one of auto, inter, csv")
    atomic = fmt == "inter" or (fmt == "auto" and path.suffix.lower() == ".inter")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("interaction file not found", path=path) from None
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise InputError("empty file (no header)", path=path, line=1)
    if atomic:
        delimiter = "\t"
    elif delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(lines[first], delimiters=",\t;|").delimiter
        except csv.Error:
            raise InputError(
                "cannot detect the delimiter of the header; pass delimiter", path=path, line=first + 1
            ) from None
    header = next(csv.reader([lines[first]], delimiter=delimiter))
    if atomic:
        untyped = [h for h in header if ":" not in h]
        if untyped:
            raise InputError(
                f"RecBole atomic header field {untyped[0]!r} has no ':type'", path=path, line=first + 1
            )
        header = [h.split(":", 1)[0] for h in header]
    cols = [_column(header, role, path) for role in ("user", "item", "time")]
    users, items, times = [], [], []
    reader = csv.reader(
        lines[first + 1 :], delimiter=delimiter, quoting=csv.QUOTE_NONE if atomic else csv.QUOTE_MINIMAL
    )
    for offset, row in enumerate(reader):
        line = first + 2 + offset
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise InputError(f"expected {len(header)} columns, got {len(row)}", path=path, line=line)
        user, item, stamp = (row[c].strip() for c in cols)
        if not user or not item:
            raise InputError(f"empty {'user' if not user else 'item'} id", path=path, line=line)
        try:
            value = float(stamp)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"timestamp {stamp!r} is not a finite number", path=path, line=line)
        users.append(user)
        items.append(item)
        times.append(value)
    if not users:
        raise InputError("no interactions after the header", path=path, line=first + 1)
    return Interactions(
        np.asarray(users, dtype=str), np.asarray(items, dtype=str), np.asarray(times, dtype=np.float64)
    )


def _distinct_counts(keys: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per row: how many distinct ``others`` its ``keys`` value has, (M,), (M,) -> (M,)."""
    key_code = np.unique(keys, return_inverse=True)[1]
    other_code = np.unique(others, return_inverse=True)[1]
    pairs = np.unique(np.stack([key_code, other_code]), axis=1)  # (2, P) distinct (key, other) pairs
    return np.bincount(pairs[0], minlength=key_code.max() + 1)[key_code]


def filter_interactions(
    inter: Interactions, min_item_count: int = 5, min_user_count: int = 20
) -> Interactions:
    """Drop items met by fewer than ``min_item_count`` distinct users, then users with fewer than
    ``min_user_count`` distinct items (one pass each, in that order, as the SCE paper's preprocessing)."""
    keep = _distinct_counts(inter.items, inter.users) >= min_item_count  # (M,)
    inter = Interactions(inter.users[keep], inter.items[keep], inter.timestamps[keep])
    keep = _distinct_counts(inter.users, inter.items) >= min_user_count  # (M,)
    return Interactions(inter.users[keep], inter.items[keep], inter.timestamps[keep])


@dataclass
class SequenceSplit:
    """Training sequences and validation/test holdouts of a temporal split; item k is ``item_ids[k - 1]``."""

    item_ids: list[str]
    time_point: float
    train_users: list[str]
    train: list[np.ndarray]  # per training user: item indices (int64, >= 1) in time order
    test_users: list[str]
    valid_inputs: list[np.ndarray]  # per test user: the input history for the validation target
    valid_targets: np.ndarray  # (U,)
    test_inputs: list[
        np.ndarray
    ]  # per test user: the input history for the test target (ends with valid target)
    test_targets: np.ndarray  # (U,)

    @property
    def num_items(self) -> int:
        """C, the catalog size (padding not counted)."""
        return len(self.item_ids)

    def stats(self) -> dict[str, float]:
        """Catalog size, training users/interactions/mean length, test users and the time point."""
        lengths = [len(s) for s in self.train]
        mean_length = float(np.mean(lengths)) if lengths else 0.0
        return {
            "num_items": self.num_items,
            "train_users": len(self.train),
            "train_interactions": sum(lengths),
            "mean_train_length": mean_length,
            "test_users": len(self.test_users),
            "time_point": self.time_point,
        }


def _group(users: np.ndarray, rows: np.ndarray, items: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Split ``rows`` (already in time order) by user, keeping that order; users sorted by id."""
    names, code = np.unique(users[rows], return_inverse=True)
    by_user = np.argsort(code, kind="stable")  # (R,) stable: time order kept inside each user
    bounds = np.cumsum(np.bincount(code, minlength=len(names)))[:-1]
    return [str(n) for n in names], np.split(items[rows[by_user]], bounds)


def temporal_split(inter: Interactions, quantile: float = 0.95) -> SequenceSplit:
    """The SCE paper's global temporal split (official ``data.py::get_dataset``, ``splitting='temporal'``).

    The time point is the ``quantile`` of all timestamps (``nearest`` interpolation, as pandas
    ``quantile(0.95, interpolation='nearest')``). Users with any interaction at or after it are test users and
    are left out of training; every other user's full history is a training sequence, and the item catalog is
    the set of items in training. A test user's interactions at or after the time point whose item is in the
    catalog, in time order, give: test target = the last, validation target = the one before, inputs = what
    precedes each target. Test users with fewer than 3 such interactions are dropped. Ties in time keep file
    order (the official code breaks a tie for the last place at random, with a fixed random state).
    """
    if not 0.0 < quantile < 1.0:
        raise InputError(f"quantile must be in (0, 1), got {quantile}")
    time_point = float(np.quantile(inter.timestamps, quantile, method="nearest"))
    order = np.argsort(inter.timestamps, kind="stable")  # (M,) time order, ties in file order
    late = inter.timestamps[order] >= time_point  # (M,)
    test_user_set = np.unique(inter.users[order][late])
    is_test = np.isin(inter.users[order], test_user_set)  # (M,)
    item_ids = sorted(set(inter.items[order][~is_test].tolist()))
    lookup = {item: k + 1 for k, item in enumerate(item_ids)}
    codes = np.asarray(
        [lookup.get(item, PAD) for item in inter.items[order].tolist()], dtype=np.int64
    )  # (M,)
    train_users, train = _group(inter.users[order], np.flatnonzero(~is_test), codes)
    test_rows = np.flatnonzero(is_test & late & (codes != PAD))
    candidates, histories = _group(inter.users[order], test_rows, codes)
    kept = [(u, h) for u, h in zip(candidates, histories, strict=True) if len(h) >= 3]
    return SequenceSplit(
        item_ids=item_ids,
        time_point=time_point,
        train_users=train_users,
        train=train,
        test_users=[u for u, _ in kept],
        valid_inputs=[h[:-2] for _, h in kept],
        valid_targets=np.asarray([h[-2] for _, h in kept], dtype=np.int64),
        test_inputs=[h[:-1] for _, h in kept],
        test_targets=np.asarray([h[-1] for _, h in kept], dtype=np.int64),
    )


def left_pad(sequences: Sequence[np.ndarray], maxlen: int) -> torch.Tensor:
    """The last ``maxlen`` items of each sequence, right-aligned and left-padded with 0: (B, maxlen) int64."""
    out = torch.zeros(len(sequences), maxlen, dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        tail = seq[len(seq) - maxlen :] if len(seq) > maxlen else seq
        if len(tail):
            out[row, maxlen - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
    return out


def training_batch(
    sequences: Sequence[np.ndarray], maxlen: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-item batch as the official ``SequentialDataset``: the last ``maxlen + 1`` items of each sequence.

    Returns:
        inputs (B, L): items 1..n-1 of the tail; targets (B, L): items 2..n (0 = padding, no loss);
        history (B, H): every item of the full sequence (not only the tail), -1 padded, for negative sampling
        of unseen items.
    """
    inputs = left_pad([s[:-1] for s in sequences], maxlen)  # (B, L)
    targets = left_pad([s[1:] for s in sequences], maxlen)  # (B, L)
    history = torch.full((len(sequences), max(len(s) for s in sequences)), -1, dtype=torch.long)  # (B, H)
    for row, seq in enumerate(sequences):
        history[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return inputs, targets, history


def batch_order(num_sequences: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch: index batches of ``batch_size``; a last partial batch is dropped unless it is the
    only one (the official loader uses ``drop_last=True``)."""
    perm = torch.randperm(num_sequences, generator=generator)  # (S,)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
