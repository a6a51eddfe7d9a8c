"""Run files: write and read TREC (``qid Q0 docid rank score tag``) and MS MARCO (``qid\\tpid\\trank``) runs.

A run is the plain nested dict that ``ir_measures`` accepts directly: ``{query_id: {doc_id: score}}``.
Hits are always written in one deterministic order (score descending, then doc id ascending as a string),
so the same run gives byte-identical files whatever order the dict was filled in.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dualenc.errors import InputError
from dualenc.io.atomic import write_lines
from dualenc.io.input_files import iter_lines

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # query_id -> {doc_id: score}
FORMATS = ("trec", "msmarco")


def sorted_hits(hits: Mapping[str, float]) -> list[tuple[str, float]]:
    """Hits in the canonical order: score descending, then doc id ascending (string order)."""
    return sorted(hits.items(), key=lambda item: (-item[1], item[0]))


def _check_token(value: str, what: str) -> None:
    if not value or any(ch.isspace() for ch in value):
        raise InputError(
            f"{what} {value!r} is empty or contains whitespace; it cannot be written to a run file"
        )


def _format_lines(run: Run, fmt: str, tag: str, k: int | None) -> list[str]:
    lines = []
    for query_id, hits in run.items():
        _check_token(query_id, "query id")
        ranked = sorted_hits(hits)
        for rank, (doc_id, score) in enumerate(ranked[:k] if k is not None else ranked, start=1):
            _check_token(doc_id, "doc id")
            score = float(score)
            if not math.isfinite(score):
                raise InputError(f"score {score} for query {query_id!r}, doc {doc_id!r} is not finite")
            if fmt == "trec":
                lines.append(f"{query_id} Q0 {doc_id} {rank} {score!r} {tag}")
            else:
                lines.append(f"{query_id}\t{doc_id}\t{rank}")
    return lines


def write_run(
    run: Run, path: str | os.PathLike, *, format: str = "trec", tag: str = "dualenc", k: int | None = None
) -> None:
    """Write ``run`` atomically.

    Args:
        run: ``{query_id: {doc_id: score}}``; queries are written in the dict's insertion order.
        path: output file.
        format: ``"trec"`` (``qid Q0 docid rank score tag``; ``repr`` floats, so scores read back
            exactly) or ``"msmarco"`` (``qid<TAB>pid<TAB>rank``; scores are not stored).
        tag: run tag (TREC only).
        k: keep only the top ``k`` hits per query (``None``: all).
    """
    if format not in FORMATS:
        raise InputError(f"unknown run format {format!r}; expected one of {FORMATS}")
    if k is not None and k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    _check_token(tag, "run tag")
    write_lines(path, _format_lines(run, format, tag, k))


def _parse_rank(value: str, path: Path, line_no: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"rank {value!r} is not an integer", path=path, line=line_no) from None


def _parse_score(value: str, path: Path, line_no: int) -> float:
    try:
        score = float(value)
    except ValueError:
        raise InputError(f"score {value!r} is not a number", path=path, line=line_no) from None
    if not math.isfinite(score):
        raise InputError(f"score {value!r} is not finite", path=path, line=line_no)
    return score


def _parse_line(line: str, fmt: str, path: Path, line_no: int) -> tuple[str, str, float]:
    """``(query_id, doc_id, score)`` of one non-empty line of a ``fmt`` run."""
    if fmt == "trec":
        fields = line.split()
        if len(fields) != 6:
            raise InputError(
                f"expected 6 space-separated TREC columns (qid Q0 docid rank score tag), got {len(fields)}: "
                f"{line!r}",
                path=path,
                line=line_no,
            )
        _parse_rank(fields[3], path, line_no)
        return fields[0], fields[2], _parse_score(fields[4], path, line_no)
    fields = line.split("\t")
    if len(fields) != 3 or any(not f.strip() for f in fields):
        raise InputError(
            f"expected 3 tab-separated MS MARCO columns (qid pid rank), got {len(fields)}: {line!r}",
            path=path,
            line=line_no,
        )
    # Only the rank is stored: score = -rank keeps the rank order for evaluation.
    return fields[0].strip(), fields[1].strip(), float(-_parse_rank(fields[2].strip(), path, line_no))


def _detect_format(line: str, path: Path, line_no: int) -> str:
    if len(line.split()) == 6:
        return "trec"
    if len(line.split("\t")) == 3:
        return "msmarco"
    raise InputError(
        f"not a run file: expected 6 TREC columns or 3 tab-separated MS MARCO columns, got {line!r}",
        path=path,
        line=line_no,
    )


def read_run(path: str | os.PathLike) -> Run:
    """Read a TREC or MS MARCO run (format detected on the first non-empty line, then required on all).

    MS MARCO runs carry no scores: each hit gets ``score = -rank``. Blank lines are skipped; a ``.gz`` run is
    read decompressed.

    Raises:
        InputError: missing or empty file, wrong column count, non-numeric score or rank,
            duplicate ``(query_id, doc_id)``; the message names the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("run file not found", path=path)
    run: Run = {}
    first_seen: dict[tuple[str, str], int] = {}
    fmt = None
    for line_no, line in iter_lines(str(path)):  # gzip aware; a bad byte or gzip stream is one clear error
        fmt = fmt or _detect_format(line, path, line_no)
        query_id, doc_id, score = _parse_line(line, fmt, path, line_no)
        key = (query_id, doc_id)
        if key in first_seen:
            raise InputError(
                f"duplicate hit: query {query_id!r}, doc {doc_id!r} (first on line {first_seen[key]})",
                path=path,
                line=line_no,
            )
        first_seen[key] = line_no
        run.setdefault(query_id, {})[doc_id] = score
    if fmt is None:
        raise InputError("empty run file", path=path)
    return run


def run_from_search(
    query_ids: Sequence[str], doc_ids: Sequence[str] | np.ndarray, scores: np.ndarray, indices: np.ndarray
) -> Run:
    """Turn a search result into a run.

    Args:
        query_ids: one id per query row.
        doc_ids: doc id of every global corpus row.
        scores: search scores.
        indices: global corpus rows; ``-1`` (faiss's "no result") is skipped.

    Shapes:
        scores, indices: (Q, k)
    """
    scores = np.asarray(scores)
    indices = np.asarray(indices)
    if scores.ndim != 2 or scores.shape != indices.shape or scores.shape[0] != len(query_ids):
        raise InputError(
            f"scores {scores.shape} and indices {indices.shape} must both be (Q, k) with Q = "
            f"{len(query_ids)} query ids"
        )
    if indices.size and int(indices.max()) >= len(doc_ids):
        raise InputError(f"index {int(indices.max())} out of range for {len(doc_ids)} doc ids")
    run: Run = {}
    for query_id, row_scores, row_indices in zip(query_ids, scores.tolist(), indices.tolist(), strict=True):
        run[str(query_id)] = {
            str(doc_ids[i]): s for s, i in zip(row_scores, row_indices, strict=True) if i >= 0
        }
    return run
