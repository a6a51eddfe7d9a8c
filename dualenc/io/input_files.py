"""Opening input files: check that one exists, read its lines (gzip aware) or its JSON, report ``path:line``.

Line conventions shared by every text reader of dualenc (:mod:`dualenc.io.readers`, the training formats):

- A line loses only its line end (``\\n``, ``\\r\\n``), and the first line its UTF-8 byte-order mark; the
  rest is kept as written.
- Blank lines (empty or whitespace only) are skipped but still counted, so every line number in an error is
  the 1-based physical line of the file.
- A file whose name ends in ``.gz`` (any case) is read through gzip; one that is not gzip, or whose stream
  is corrupt or cut short, is reported as "not a valid gzip file", never as the garbled line it produced
  (:func:`gzip_errors_first`). A gzip file whose name lacks ``.gz`` is reported as such.
- Every bad input raises one :class:`~dualenc.errors.InputError` line: ``path:line: problem``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dualenc.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_PROBLEM = "not a valid gzip file"


def existing_file(path: str | os.PathLike) -> str:
    """The resolved path of ``path`` as a string; ``InputError`` if it is missing or a directory."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        problem = "is a directory, expected a file" if resolved.is_dir() else "file not found"
        raise InputError(problem, path=path)
    return str(resolved)


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without its line end)`` for every non-blank line.

    Lines are decoded one at a time, so a bad byte is reported with its own line number. A ``.gz`` file that
    is not gzip, or whose compressed stream is corrupt or cut short, raises "not a valid gzip file".
    """
    lineno = 0
    try:
        with _open_binary(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise _decode_error(path, lineno, raw, err) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if line and not line.isspace():
                    yield lineno, line
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # bad or truncated gzip stream
        raise _gzip_error(path, lineno, err) from None
    except OSError as err:  # unreadable file
        raise InputError(f"cannot read the file: {err.strerror or err}", path=path, line=lineno + 1) from None


def _decode_error(path: str, lineno: int, raw: bytes, err: UnicodeDecodeError) -> InputError:
    if lineno == 1 and raw.startswith(_GZIP_MAGIC):
        return InputError("the file is gzip-compressed but its name does not end in .gz", path=path)
    bad = raw[err.start : err.start + 1]
    return InputError(
        f"not valid UTF-8: byte {bad!r} at byte offset {err.start} of the line", path=path, line=lineno
    )


def _gzip_error(path: str, lineno: int, err: BaseException) -> InputError:
    where = f", after line {lineno}" if lineno else ""
    return InputError(f"{_GZIP_PROBLEM} ({err}{where})", path=path)


def check_gzip(path: str) -> None:
    """Read a ``.gz`` file to its end; ``InputError`` "not a valid gzip file" if its stream is corrupt.

    Called on an error path only: a corrupt stream can first decompress into garbage lines, and the line
    error they raise would hide the real problem.
    """
    if not path.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _gzip_error(path, 0, err) from None


@contextmanager
def gzip_errors_first(path: str) -> Iterator[None]:
    """Re-raise a line error of a ``.gz`` file as its gzip error when the compressed stream is corrupt."""
    try:
        yield
    except InputError as err:
        if not err.problem.startswith(_GZIP_PROBLEM):
            check_gzip(path)
        raise


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
    except UnicodeDecodeError as err:
        raise InputError(f"invalid JSON: not UTF-8 text (byte offset {err.start})", path=path) from err
