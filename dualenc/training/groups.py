"""Query groups from training records: document ids (or texts) resolved to corpus rows, lines of one query
merged, a query's positives removed from its negatives (the rules in :mod:`dualenc.training.data`); and the
groups of the qrels format, straight from the judgments."""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dualenc.errors import InputError
from dualenc.io.input_files import iter_lines
from dualenc.training.formats import Doc, Record

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_DIGEST_SIZE = 12  # 96-bit content hash: P(any collision) < 1e-14 for 10^7 distinct texts


def text_id(title: str, text: str) -> str:
    """A stable id for a document (or, with ``title=""``, a query) that has none: 24 hex digits of BLAKE2b."""
    return _digest(title, text).hex()


def _digest(title: str, text: str) -> bytes:
    return hashlib.blake2b(f"{title}\x00{text}".encode(), digest_size=_DIGEST_SIZE).digest()


class CorpusRows:
    """Doc id -> corpus row through one dict built once (~120 bytes per id: ~1 GB for MS MARCO's 8.8M ids)."""

    def __init__(self, corpus: datasets.Dataset, corpus_path: str):
        ids = corpus.data.column("id").to_pylist()  # a fresh read_collection dataset: no indices mapping
        self.rows = dict(zip(ids, range(len(ids)), strict=True))
        self.corpus_path = corpus_path

    def row(self, ref: str | Doc, path: str, lineno: int | None) -> int:
        doc_id = ref
        if isinstance(ref, Doc):
            if ref.docid is None:
                raise InputError(
                    "a passage has no 'docid': with corpus_file every passage needs one",
                    path=path,
                    line=lineno,
                )
            doc_id = ref.docid
        row = self.rows.get(doc_id)
        if row is None:
            raise InputError(
                f"doc id {doc_id!r} is not in the corpus {self.corpus_path}", path=path, line=lineno
            )
        return row


class NewDocs:
    """Rows for the passages of the train file itself, numbered in order of first appearance.

    Keyed by docid, or by the content digest when there is none (~130 bytes per distinct passage).
    """

    def __init__(self) -> None:
        self.rows: dict[str | bytes, int] = {}
        self.digests = bytearray()  # _DIGEST_SIZE bytes per row: catches one docid used for two texts
        self.lines = array("q")  # first line of each row

    def add(self, doc: Doc, path: str, lineno: int) -> tuple[int, bool]:
        """``(row, is_new)`` of ``doc``."""
        digest = _digest(doc.title, doc.text)
        key = digest if doc.docid is None else doc.docid
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = len(self.rows)
            self.digests += digest
            self.lines.append(lineno)
            return row, True
        if doc.docid is not None and self.digests[row * _DIGEST_SIZE : (row + 1) * _DIGEST_SIZE] != digest:
            raise InputError(
                f"doc id {doc.docid!r} has a different title/text than on line {self.lines[row]}",
                path=path,
                line=lineno,
            )
        return row, False

    def row(self, doc: Doc, path: str, lineno: int) -> int:
        return self.add(doc, path, lineno)[0]


class Groups:
    """Query -> group number (order of first appearance) and the (group, row) pairs, 8 bytes each."""

    def __init__(self, query_texts: dict[str, str] | None, queries_path: str | None):
        self.query_texts, self.queries_path = query_texts, queries_path
        self.number: dict[str, int] = {}
        self.query_ids: list[str] = []
        self.queries: list[str] = []
        self.lines = array("q")  # first line of each group
        self.num_records = 0
        self.pos, self.neg = array("q"), array("q")  # (group << 32) | row: corpus rows < 2^32

    def add(self, record: Record, path: str, rows: CorpusRows | NewDocs) -> None:
        self.num_records += 1
        query_id = record.query_id if record.query_id is not None else text_id("", record.query)
        query = record.query
        if query is None:
            if self.query_texts is None:
                raise InputError(
                    f"no 'query' for query id {query_id!r} and no queries_file given",
                    path=path,
                    line=record.line,
                )
            query = self.query_texts.get(query_id)
            if query is None:
                raise InputError(
                    f"query id {query_id!r} is not in the queries file {self.queries_path}",
                    path=path,
                    line=record.line,
                )
        group = self.number.get(query_id)
        if group is None:
            group = self.number[query_id] = len(self.query_ids)
            self.query_ids.append(query_id)
            self.queries.append(query)
            self.lines.append(record.line)
        elif self.queries[group] != query:
            raise InputError(
                f"query id {query_id!r} has a different query text than on line {self.lines[group]}",
                path=path,
                line=record.line,
            )
        high = group << 32
        self.pos.extend(high | rows.row(ref, path, record.line) for ref in record.positives)
        self.neg.extend(high | rows.row(ref, path, record.line) for ref in record.negatives)

    def rows(self) -> Iterator[dict[str, Any]]:
        """The merged groups as dataset rows; logs what merging and de-duplication removed."""
        num_groups = len(self.query_ids)
        pos_keys = np.frombuffer(self.pos, dtype=np.int64)  # (E_pos,)
        pos_offsets, pos_rows, _ = _group_pairs(pos_keys, num_groups)
        neg_keys = np.frombuffer(self.neg, dtype=np.int64)  # (E_neg,)
        neg_offsets, neg_rows, num_dropped = _group_pairs(neg_keys, num_groups, exclude=pos_keys)
        logger.info(
            "%d lines -> %d query groups; %d positives, %d negatives (%d repeated pairs merged); dropped %d "
            "negatives that are positives of the same query",
            self.num_records,
            num_groups,
            len(pos_rows),
            len(neg_rows),
            len(pos_keys) + len(neg_keys) - len(pos_rows) - len(neg_rows) - num_dropped,
            num_dropped,
        )
        for group in range(num_groups):
            yield {
                "query_id": self.query_ids[group],
                "query": self.queries[group],
                "positives": pos_rows[pos_offsets[group] : pos_offsets[group + 1]].tolist(),
                "negatives": neg_rows[neg_offsets[group] : neg_offsets[group + 1]].tolist(),
            }


def _group_pairs(
    keys: np.ndarray, num_groups: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct ``(group << 32) | row`` keys, ordered by group then first appearance, minus ``exclude``.

    Returns:
        ``(offsets, rows, num_excluded)``: group ``g`` owns ``rows[offsets[g]:offsets[g + 1]]``.

    Shapes:
        keys: (E,); offsets: (num_groups + 1,); rows: (E_distinct,)
    """
    distinct, first = np.unique(keys, return_index=True)  # (U,), (U,): sorted by group, then row
    num_excluded = 0
    if exclude is not None and len(distinct):
        keep = ~np.isin(distinct, exclude)  # (U,)
        num_excluded = int(len(keep) - keep.sum())
        distinct, first = distinct[keep], first[keep]
    distinct = distinct[np.lexsort((first, distinct >> 32))]  # (U,) by group, then first appearance
    offsets = np.searchsorted(distinct >> 32, np.arange(num_groups + 1))  # (G + 1,)
    return offsets, distinct & 0xFFFFFFFF, num_excluded


def qrels_groups(
    qrels: dict[str, dict[str, int]],
    query_texts: Mapping[str, str],
    doc_rows: Mapping[str, int],
    min_relevance: int,
    *,
    qrels_file: str,
    queries_file: str,
    corpus_file: str,
) -> Iterator[dict[str, Any]]:
    """One group per judged query with a grade >= ``min_relevance``; no negatives.

    Args:
        qrels: ``{query_id: {doc_id: grade}}`` as :func:`dualenc.io.qrels.read_qrels` returns it.
        query_texts: query id -> text.
        doc_rows: doc id -> corpus row.
        min_relevance: the smallest grade that counts as a positive.
        qrels_file, queries_file, corpus_file: the files, named in errors.

    Returns:
        Group rows ``{"query_id", "query", "positives", "negatives": []}`` in qrels order.
    """
    num_groups = 0
    for query_id, judged in qrels.items():
        positive_ids = [doc_id for doc_id, grade in judged.items() if grade >= min_relevance]
        if not positive_ids:
            continue
        query = query_texts.get(query_id)
        if query is None:
            line = _qrels_line(qrels_file, query_id, None)
            raise InputError(
                f"query id {query_id!r} is not in the queries file {queries_file}", path=qrels_file, line=line
            )
        unknown = next((doc_id for doc_id in positive_ids if doc_id not in doc_rows), None)
        if unknown is not None:
            line = _qrels_line(qrels_file, query_id, unknown)
            raise InputError(
                f"doc id {unknown!r} is not in the corpus {corpus_file}", path=qrels_file, line=line
            )
        positives = [doc_rows[doc_id] for doc_id in positive_ids]
        num_groups += 1
        yield {"query_id": query_id, "query": query, "positives": positives, "negatives": []}
    logger.info(
        "qrels: %d of %d judged queries have a grade >= %d (the others are skipped)",
        num_groups,
        len(qrels),
        min_relevance,
    )
    if num_groups == 0:
        raise InputError(f"no query has a judgment with grade >= {min_relevance}", path=qrels_file)


def _qrels_line(path: str, query_id: str, doc_id: str | None) -> int | None:
    """The first line of ``path`` that judges ``query_id`` (and ``doc_id``); error path only."""
    for lineno, line in iter_lines(path):
        cols = line.split()
        if cols and cols[0] == query_id and (doc_id is None or doc_id in cols[1:-1]):
            return lineno
    return None
