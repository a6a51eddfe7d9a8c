"""Which TSV column holds what: the one column rule of collections and queries, checked line by line.

The rule (:mod:`dualenc.io.readers` states it for users):

- Without a header or ``columns``: a collection line is ``id<TAB>text`` (2 columns) or
  ``id<TAB>title<TAB>text`` (3 columns); a queries line is ``id<TAB>text``. Any other count is an error.
- A header line names the columns: a first line whose tab-separated cells include ``id`` and ``text``
  (any case, each once) and are all names (letters, digits, ``_``, ``-``). ``title`` is optional; any other
  name is a column that is read and ignored (DPR's ``id<TAB>text<TAB>title`` is such a file).
- ``columns`` names them explicitly, e.g. ``"id,text,-"``: one name per column, each ``id``, ``title``,
  ``text`` or ``-`` (ignored). A first line that is a header is still skipped.

Every line must have the column count of the first data line; a line that does not is an error naming the
file, the line and both counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dualenc.errors import InputError

COLUMN_NAMES = ("id", "title", "text", "-")
_HEADER_CELL = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class TsvLayout:
    """Where a TSV file keeps each field: column indices, the column count, and whether line 1 is a header."""

    width: int
    id_col: int
    text_col: int
    title_col: int | None
    header: bool


def parse_columns(columns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"id,text,-"`` or ``["id", "text", "-"]`` -> names; ``InputError`` on an unknown or repeated name."""
    if columns is None:
        return None
    names = tuple(c.strip().lower() for c in (columns.split(",") if isinstance(columns, str) else columns))
    for name in names:
        if name not in COLUMN_NAMES:
            raise InputError(
                f"columns={columns!r}: unknown column name {name!r} (use {', '.join(COLUMN_NAMES)})"
            )
    for name in ("id", "text"):
        if names.count(name) != 1:
            raise InputError(f"columns={columns!r}: name the {name!r} column exactly once")
    if names.count("title") > 1:
        raise InputError(f"columns={columns!r}: name the 'title' column at most once")
    return names


def _layout(names: Sequence[str], header: bool) -> TsvLayout:
    title = names.index("title") if "title" in names else None
    return TsvLayout(len(names), names.index("id"), names.index("text"), title, header)


def _header_names(cells: list[str]) -> list[str] | None:
    """The lower-cased names of a header line, or None when ``cells`` is not one."""
    names = [cell.strip().lower() for cell in cells]
    if not all(_HEADER_CELL.fullmatch(name) for name in names):
        return None
    if names.count("id") != 1 or names.count("text") != 1 or names.count("title") > 1:
        return None
    return names


def first_line_layout(
    cells: list[str], kind: str, columns: tuple[str, ...] | None, path: str, lineno: int
) -> TsvLayout:
    """The layout that the first non-blank line (its ``cells``) and ``columns`` give a ``kind`` file."""
    header = _header_names(cells)
    if columns is not None:
        return _layout(columns, header is not None)
    if header is not None:
        return _layout(header, True)
    if len(cells) == 2:
        return _layout(("id", "text"), False)
    if len(cells) == 3 and kind == "collection":
        return _layout(("id", "title", "text"), False)
    want = "2 (id, text) or 3 (id, title, text)" if kind == "collection" else "2 (id, text)"
    raise InputError(
        f"expected {want} tab-separated columns, found {len(cells)}; name the columns with a header line "
        "(e.g. id<TAB>text<TAB>title) or columns='id,text,-' (--columns)",
        path=path,
        line=lineno,
    )


def check_width(cells: list[str], layout: TsvLayout, path: str, lineno: int) -> None:
    """``InputError`` naming the line when it does not have the layout's column count."""
    if len(cells) != layout.width:
        raise InputError(
            f"expected {layout.width} tab-separated columns (as on the first line), found {len(cells)}",
            path=path,
            line=lineno,
        )
