"""Relevance judgments (qrels): a TREC or BEIR qrels file -> ``{query_id: {doc_id: grade}}``.

The layout is read from the first non-blank line, whatever the file's suffix (``.gz`` means gzip): TREC
``qid iter docid rel`` (4 columns, any whitespace; ``iter`` is ignored: ``Q0``, ``0``), or BEIR TSV with the
header ``query-id<TAB>corpus-id<TAB>score``. Ids stay strings as written; relevance is an integer. A repeated
(qid, docid) with the same grade is accepted once, with a different grade it is an error. Lines are read as
:mod:`dualenc.io.input_files` reads them, and every bad line raises one ``path:line: problem`` error.
"""

from __future__ import annotations

import os
import re

from dualenc.errors import InputError
from dualenc.io.input_files import existing_file, gzip_errors_first, iter_lines

_BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]
_INT_RE = re.compile(r"[+-]?[0-9]+")


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Read relevance judgments (TREC 4-column or BEIR TSV with header).

    Args:
        path: the qrels file.

    Returns:
        ``{qid: {docid: grade}}``, zero grades included, in file order.

    Raises:
        InputError: missing or empty file, wrong column count, non-integer grade, conflicting duplicate.
    """
    existing_file(path)
    path = str(path)  # errors name the file as the caller wrote it
    with gzip_errors_first(path):  # a garbled .gz is reported as such, not as the bad line it made
        return _read_qrels(path)


def _read_qrels(path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    beir: bool | None = None
    for lineno, line in iter_lines(path):
        if beir is None:
            beir = line.split() == _BEIR_QRELS_HEADER
            if beir:
                continue
        if beir:
            cols = line.split("\t")
            if len(cols) != 3:
                raise InputError(
                    f"expected 3 tab-separated columns, found {len(cols)}", path=path, line=lineno
                )
            qid, doc_id, grade = cols
        else:
            cols = line.split()
            if len(cols) != 4:
                raise InputError(
                    f"expected 4 columns (qid iter docid rel), found {len(cols)}", path=path, line=lineno
                )
            qid, _, doc_id, grade = cols
        if not _INT_RE.fullmatch(grade):
            raise InputError(f"relevance {grade!r} is not an integer", path=path, line=lineno)
        seen = qrels.setdefault(qid, {}).get(doc_id)
        if seen is not None and seen != int(grade):
            raise InputError(
                f"qid {qid!r} docid {doc_id!r}: grade {grade} here, {seen} on line {first_line[qid, doc_id]}",
                path=path,
                line=lineno,
            )
        first_line.setdefault((qid, doc_id), lineno)
        qrels[qid][doc_id] = int(grade)
    if not qrels:
        raise InputError("empty file: no judgments" + (" after the header" if beir else ""), path=path)
    return qrels
