"""Opening input files: check that one exists, read its lines (gzip aware) or its JSON, report ``path:line``.

Line conventions shared by every text reader of dualenc (:mod:`dualenc.io.readers`, the training formats):

- A line loses only its line end (``\\n``, ``\\r\\n``), and the first line its UTF-8 byte-order mark; the
  rest is kept as written.
- Blank lines (empty or whitespace only) are skipped but still counted, so every line number in an error is
  the 1-based physical line of the file.
- A file whose name ends in ``.gz`` (any case) is read through gzip.
- Every bad input raises one :class:`~dualenc.errors.InputError` line: ``path:line: problem``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dualenc.errors import InputError


def existing_file(path: str | os.PathLike) -> str:
    """The resolved path of ``path`` as a string; ``InputError`` if it is missing or a directory."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        problem = "is a directory, expected a file" if resolved.is_dir() else "file not found"
        raise InputError(problem, path=path)
    return str(resolved)


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without its line end)`` for every non-blank line.

    Lines are decoded one at a time, so a bad byte is reported with its own line number.
    """
    lineno = 0
    try:
        with _open_binary(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    bad = raw[err.start : err.start + 1]
                    raise InputError(
                        f"not valid UTF-8: byte {bad!r} at byte offset {err.start} of the line",
                        path=path,
                        line=lineno,
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if line and not line.isspace():
                    yield lineno, line
    except (OSError, EOFError, zlib.error) as err:  # unreadable file, bad or truncated gzip stream
        raise InputError(f"cannot read the file: {err}", path=path, line=lineno + 1) from None


def _open_binary(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file or bad JSON raises ``InputError`` naming the file (and line)."""
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path=path, line=err.lineno) from err
