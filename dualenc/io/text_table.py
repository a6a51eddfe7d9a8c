"""Plain-text tables of results (measures, benchmarks), with no dependency beyond the standard library.

Kept apart from :mod:`dualenc.evaluation.measures`: printing a table does not import ir-measures.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # bool is Integral
        return f"{float(value):.4f}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table: one row per mapping, floats with 4 decimals, missing cells as ``-``.

    Numeric columns are right-aligned, the others left-aligned; columns are two spaces apart, the header
    is underlined with dashes, and lines carry no trailing spaces.

    Args:
        rows: one mapping ``{column: value}`` per row.
        columns: column order; default every key in order of first appearance.

    Returns:
        The table, lines joined by ``\\n`` without a final newline; ``""`` if there are no columns.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    present = [[row[col] for row in rows if row.get(col) is not None] for col in columns]
    numeric = [bool(values) and all(_is_number(v) for v in values) for values in present]

    def render(texts: Sequence[str]) -> str:
        parts = [t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [render(list(columns)), render(["-" * w for w in widths])]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
