"""Readers of document collections and queries: a TSV or JSONL file -> a memory-mapped ``datasets.Dataset``.

Formats, chosen by the file name's suffix (case-insensitive; ``.gz`` means gzip):

- **TSV** (``.tsv``, ``.tsv.gz``; also ``.txt``, ``.txt.gz`` as Anserini/pyserini name their topics):
  collection ``pid<TAB>text`` (2 columns, MS MARCO) or ``pid<TAB>title<TAB>text`` (3 columns); queries
  ``qid<TAB>text``. Any other column count is an error naming the file, the line and the count: extra
  columns are never guessed at. Another layout is named by a header line (first line with ``id`` and
  ``text`` among its names, e.g. DPR's ``id<TAB>text<TAB>title``; other names are ignored columns) or by
  ``columns="id,text,-"`` (``-``: an ignored column). The first data line fixes the column count and every
  line must have it. No quoting: a tab always separates columns, a ``"`` is text. The rule in full:
  :mod:`dualenc.io.tsv_columns`.
- **JSONL** (``.jsonl``, ``.jsonl.gz``), BEIR: corpus ``{"_id", "title", "text", ...}`` ("title"
  optional, extra keys ignored), queries ``{"_id", "text", ...}``. ``_id`` is a JSON string (an integer is
  taken as its decimal text).

Relevance judgments (qrels) have their own reader: :mod:`dualenc.io.qrels`.

Conventions:

- Lines are read as :mod:`dualenc.io.input_files` reads them: gzip by suffix, line ends and a leading UTF-8
  byte-order mark removed, blank lines skipped but counted, every error one ``path:line: problem`` line.
- Ids stay strings exactly as written (``"007"`` stays ``"007"``). Text is kept as written.
- Empty means empty after stripping whitespace. An empty id or query text is an error. A document is an
  error only when its title *and* text are both empty: a title with an empty text is kept (BEIR corpora
  such as TREC-COVID hold title-only documents).
- Collections and queries are built with ``datasets.Dataset.from_generator``: the file is streamed line by
  line into Arrow files in the datasets cache and the result is memory-mapped. The file's resolved path,
  size and ``mtime_ns`` (and a hash of this module and of :mod:`dualenc.io.input_files`) are generator
  arguments, so they are part of the cache fingerprint and a changed file is read again. Ids are checked
  for uniqueness with pyarrow on the finished table on every call (cached or not), so no Python set of
  ids is ever built.
- ``datasets`` and ``pyarrow`` are imported only when a file is read, so importing this module needs
  neither.
- An encoder sees a document as :func:`doc_text` (title and text joined); :func:`doc_texts` applies it to
  a whole collection or to a batch of its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import dualenc.io.input_files as input_files
import dualenc.io.tsv_columns as tsv_columns
from dualenc.errors import InputError
from dualenc.io.input_files import existing_file, gzip_errors_first, iter_lines
from dualenc.io.tsv_columns import check_width, first_line_layout, parse_columns

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_TSV_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def doc_text(title: str, text: str) -> str:
    """The text an encoder sees for a document: ``title + " " + text``, or the non-blank one alone."""
    if not title.strip():
        return text
    if not text.strip():
        return title
    return title + " " + text


def doc_texts(rows: Mapping[str, Sequence[str]] | datasets.Dataset) -> list[str]:
    """The :func:`doc_text` of each row of a collection, or of a batch of its rows, in order.

    Args:
        rows: a dataset from :func:`read_collection` / :func:`read_queries`, or the columns that
            ``dataset[start:end]`` or ``dataset[indices]`` return: ``text``, and ``title`` when the dataset
            has one (queries have none: their text is used as is).
    """
    columns = rows.column_names if hasattr(rows, "column_names") else rows  # a Dataset, or a dict of columns
    texts = rows["text"]
    titles = rows["title"] if "title" in columns else [""] * len(texts)
    return [doc_text(title, text) for title, text in zip(titles, texts, strict=True)]


def read_collection(
    path: str | os.PathLike, *, cache_dir: str | None = None, columns: str | Sequence[str] | None = None
) -> datasets.Dataset:
    """Read a document collection (MS MARCO TSV or BEIR JSONL, optionally gzipped).

    Args:
        path: the collection file (see the module docstring for the formats).
        cache_dir: datasets cache directory; ``None`` uses the datasets default.
        columns: a TSV file's columns, e.g. ``"id,text,-"`` (names ``id``, ``title``, ``text``, ``-``);
            ``None``: 2 or 3 columns, or a header line (:mod:`dualenc.io.tsv_columns`).

    Returns:
        A memory-mapped dataset with string columns ``id``, ``title`` (``""`` when absent), ``text``, in
        file order.

    Raises:
        InputError: missing or empty file, bad line (columns, empty id/text, UTF-8, JSON), duplicate id.
    """
    return _read_table(path, "collection", cache_dir, columns)


def read_queries(
    path: str | os.PathLike, *, cache_dir: str | None = None, columns: str | Sequence[str] | None = None
) -> datasets.Dataset:
    """Read queries (``qid<TAB>text`` TSV or BEIR JSONL, optionally gzipped).

    Args:
        path: the queries (topics) file.
        cache_dir: datasets cache directory; ``None`` uses the datasets default.
        columns: as in :func:`read_collection` (a ``title`` column of queries is ignored).

    Returns:
        A memory-mapped dataset with string columns ``id``, ``text``, in file order.

    Raises:
        InputError: as :func:`read_collection`.
    """
    return _read_table(path, "queries", cache_dir, columns)


def _read_table(
    path: str | os.PathLike, kind: str, cache_dir: str | None, columns: str | Sequence[str] | None
) -> datasets.Dataset:
    """Stream ``path`` into a cached Arrow dataset, then check that the ids are unique; errors name ``path``
    as the caller wrote it (the cache is keyed by the resolved path)."""
    try:
        return _read_resolved_table(path, kind, cache_dir, columns)
    except InputError as err:
        if err.path != str(Path(path).expanduser().resolve()):
            raise
        raise InputError(err.problem, path=path, line=err.line) from None


def _read_resolved_table(
    path: str | os.PathLike, kind: str, cache_dir: str | None, columns: str | Sequence[str] | None
) -> datasets.Dataset:
    import datasets

    names = parse_columns(columns)
    resolved = existing_file(path)
    fmt = _file_format(resolved)
    stat = os.stat(resolved)
    gen_kwargs = {
        "path": resolved,
        "fmt": fmt,
        "kind": kind,
        "columns": names,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        # datasets hashes `_generate_rows` but not the helpers it calls: any edit to them means a new cache
        "reader": _source_hash(__file__, input_files.__file__, tsv_columns.__file__),
    }
    # No `features=`: datasets then skips its per-row `encode_example`, which took ~85% of the build time;
    # every value is a str, so Arrow infers `string` for each column (checked in tests/test_data.py).
    with gzip_errors_first(resolved):  # a garbled .gz is reported as such, not as the bad line it made
        try:
            dataset = datasets.Dataset.from_generator(
                _generate_rows, cache_dir=cache_dir, gen_kwargs=gen_kwargs
            )
        except Exception as err:  # datasets wraps it in DatasetGenerationError (module path varies)
            cause = input_error_in_chain(err)
            if cause is None:
                raise
            raise cause from None
    _check_unique_ids(dataset, resolved)
    logger.info("read %d %s rows from %s", len(dataset), kind, resolved)
    return dataset


def _source_hash(*files: str) -> str:
    """A short hash of the source files that turn a file into rows."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


def _generate_rows(
    path: str, fmt: str, kind: str, columns: tuple[str, ...] | None, size: int, mtime_ns: int, reader: str
) -> Iterator[dict[str, str]]:
    """The ``from_generator`` callable; ``size``, ``mtime_ns`` and ``reader`` only feed the fingerprint."""
    del size, mtime_ns, reader
    rows = _tsv_rows(path, kind, columns) if fmt == "tsv" else _jsonl_rows(path, kind)
    num_rows = 0
    for row in rows:
        num_rows += 1
        yield row
    if num_rows == 0:
        raise InputError("empty file: no non-blank line", path=path)


def _tsv_rows(path: str, kind: str, columns: tuple[str, ...] | None) -> Iterator[dict[str, str]]:
    """Yield one row per non-blank TSV data line, checking the column count (:mod:`.tsv_columns`)."""
    layout = None
    for lineno, line in iter_lines(path):
        cells = line.split("\t")
        if layout is None:
            layout = first_line_layout(cells, kind, columns, path, lineno)
            if layout.header:
                continue
        check_width(cells, layout, path, lineno)
        title = "" if layout.title_col is None else cells[layout.title_col]
        yield _make_row(path, lineno, kind, cells[layout.id_col], title, cells[layout.text_col])


def _jsonl_rows(path: str, kind: str) -> Iterator[dict[str, str]]:
    """Yield one row per non-blank BEIR JSONL line."""
    for lineno, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"invalid JSON: {err.msg} at column {err.colno}", path=path, line=lineno
            ) from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, found {type(obj).__name__}", path=path, line=lineno)
        for key in ("_id", "text"):
            if key not in obj:
                raise InputError(f"missing key {key!r} (keys: {sorted(obj)[:8]})", path=path, line=lineno)
        raw_id = obj["_id"]
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        title = obj.get("title") if kind == "collection" else ""
        title = "" if title is None else title
        for key, value in (("_id", raw_id), ("title", title), ("text", obj["text"])):
            if not isinstance(value, str):
                raise InputError(f"{key!r} must be a string, found {value!r:.60}", path=path, line=lineno)
        yield _make_row(path, lineno, kind, raw_id, title, obj["text"])


def _make_row(path: str, lineno: int, kind: str, row_id: str, title: str, text: str) -> dict[str, str]:
    """Check one record and return it as a row of the dataset."""
    if not row_id.strip():
        raise InputError(f"empty id {row_id!r}", path=path, line=lineno)
    if kind == "queries":
        if not text.strip():
            raise InputError(f"empty text for query id {row_id!r}", path=path, line=lineno)
        return {"id": row_id, "text": text}
    if not text.strip() and not title.strip():
        raise InputError(f"empty text (and no title) for document id {row_id!r}", path=path, line=lineno)
    return {"id": row_id, "title": title, "text": text}


def _check_unique_ids(dataset: datasets.Dataset, path: str) -> None:
    """Raise on the first repeated id (in file order), naming both lines; pyarrow does the counting."""
    import pyarrow.compute as pc

    ids = dataset.data.column("id")  # (N,) chunked string array, memory-mapped
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    encoded = pc.dictionary_encode(ids.combine_chunks())  # codes are given in order of first appearance
    codes = np.asarray(encoded.indices)  # (N,)
    prev_max = np.concatenate([[-1], np.maximum.accumulate(codes)[:-1]])  # (N,) largest code before row i
    row = int(np.flatnonzero(codes <= prev_max)[0])  # first row whose id was already seen
    first_row = int(np.argmax(codes == codes[row]))
    lines = _line_numbers(path, {first_row, row})
    dup_id = encoded.dictionary[codes[row]].as_py()
    raise InputError(
        f"duplicate id {dup_id!r} (first on line {lines[first_row]})", path=path, line=lines[row]
    )


def _line_numbers(path: str, rows: set[int]) -> dict[int, int]:
    """Map dataset row indices to 1-based file lines by re-reading the file (error path only)."""
    found: dict[int, int] = {}
    for row, (lineno, _) in enumerate(iter_lines(path)):
        if row in rows:
            found[row] = lineno
            if len(found) == len(rows):
                break
    return found


def _file_format(path: str) -> str:
    name = path.lower()
    if name.endswith(_TSV_SUFFIXES):
        return "tsv"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(f"unknown file type: expected one of {_TSV_SUFFIXES + _JSONL_SUFFIXES}", path=path)


def input_error_in_chain(err: BaseException) -> InputError | None:
    """The InputError that ``datasets`` wrapped in a DatasetGenerationError, if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
