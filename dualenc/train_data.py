"""Training data: query groups whose positives and negatives are ROW indices of one corpus dataset.

Every document training can touch is a row of one corpus ``datasets.Dataset`` (``id``, ``title``, ``text``,
as :func:`dualenc.data.read_collection` returns it). Groups name documents by row (``int64``), so the negative
cache can store rows, re-encode a row by reading the corpus, and mask a query's known positives by row.

Formats (``load_train_data(format=...)``; ``"auto"`` picks one from the suffix and the first line, and logs
which):

- ``tevatron``: JSONL ``{"query_id"?, "query", "positive_passages": [{"docid"?, "title"?, "text"}, ...],
  "negative_passages"?: [...]}`` (Tevatron's training format). With ``corpus_file`` every passage needs a
  ``docid`` of that corpus; without it the corpus is the file's distinct passages in order of first
  appearance, keyed by ``docid`` or, without one, by :func:`text_id` of title and text.
- ``groups``: JSONL ``{"query_id", "query"?, "positive_ids": [...], "negative_ids"?: [...]}`` (what
  :mod:`dualenc.mine` writes) against ``corpus_file``; ``queries_file`` supplies a missing ``"query"``.
- ``triples``: TSV, 3 columns: ``query<TAB>positive<TAB>negative`` texts (MS MARCO
  ``triples.train.small.tsv``) or, when ``corpus_file`` and ``queries_file`` are both given, ids
  ``qid<TAB>pid<TAB>nid`` (qidpidtriples).
- ``qrels``: no train file; ``queries_file`` + ``qrels_file`` + ``corpus_file``. Positives are the judged
  documents with grade >= ``min_relevance``; no negatives (in-batch or cache training).

Rules, the same for every format:

- All lines of one query (same query id; text triples and id-less Tevatron lines: same query text) are
  MERGED into one group: positives and negatives are unioned in order of first appearance, repeats dropped.
  Merged rather than refused because qidpidtriples has one line per (query, negative), and because one group
  per query keeps all of its positives in its mask. One id with two query texts is an error (both lines).
- A negative that is also a positive of the same query is dropped at load time; the log counts them.
- Each line needs a positive (error otherwise). The qrels format instead skips (and counts) queries judged
  only below ``min_relevance``: such queries are normal in TREC qrels.
- Ids are strings (a JSON integer id is taken as its decimal text). Every id used must resolve; an unknown
  query or document id is an :class:`~dualenc.errors.InputError` naming the file, the line and the id.

Scale (MS MARCO: 8.8M passages, ~500k training queries, ~40M qidpidtriples lines): files are streamed line
by line and both datasets are built by ``datasets.Dataset.from_generator`` into the Arrow cache (a second call
with unchanged files reads the cache). Doc ids map to rows through one dict built once (about 120 bytes per
id: ~1 GB for the 8.8M MS MARCO ids); each (query, document) pair costs 8 bytes while loading, and the final
de-duplication sorts those arrays (~1 GB peak for 40M triples).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from dualenc import data as data_mod
from dualenc.data import _existing_file, _input_error_in_chain, _iter_lines, doc_text, read_collection
from dualenc.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "tevatron", "groups", "triples", "qrels")
GROUP_FEATURES = datasets.Features(
    {
        "query_id": datasets.Value("string"),
        "query": datasets.Value("string"),
        "positives": datasets.Sequence(datasets.Value("int64")),
        "negatives": datasets.Sequence(datasets.Value("int64")),
    }
)
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_TSV_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")
_DIGEST_SIZE = 12  # 96-bit content hash: P(any collision) < 1e-14 for 10^7 distinct texts


def text_id(title: str, text: str) -> str:
    """A stable id for a document (or, with ``title=""``, a query) that has none: 24 hex digits of BLAKE2b."""
    return _digest(title, text).hex()


def _digest(title: str, text: str) -> bytes:
    return hashlib.blake2b(f"{title}\x00{text}".encode(), digest_size=_DIGEST_SIZE).digest()


@dataclass
class TrainData:
    """The corpus and the query groups of a training run.

    Attributes:
        corpus: ``id``, ``title``, ``text``: every document training can touch (the cache encodes it all).
        groups: ``query_id``, ``query`` (strings), ``positives``, ``negatives`` (``list<int64>`` corpus rows).
    """

    corpus: datasets.Dataset
    groups: datasets.Dataset

    def positives_of(self, group_idx: int) -> list[int]:
        """Corpus rows of the positives of group ``group_idx``."""
        return list(self.groups[int(group_idx)]["positives"])

    def doc_ids(self, rows: list[int]) -> list[str]:
        """The string ids of corpus ``rows``."""
        return list(self.corpus[list(rows)]["id"])


def load_train_data(
    train_file: str | os.PathLike | None = None,
    *,
    format: str = "auto",
    corpus_file: str | os.PathLike | None = None,
    queries_file: str | os.PathLike | None = None,
    qrels_file: str | os.PathLike | None = None,
    min_relevance: int = 1,
    cache_dir: str | None = None,
) -> TrainData:
    """Read training data in any of the formats of the module docstring.

    Args:
        train_file: Tevatron / groups JSONL or triples TSV (optionally gzipped); ``None`` for qrels.
        format: ``auto | tevatron | groups | triples | qrels``.
        corpus_file: collection (TSV or BEIR JSONL); required by groups, id triples and qrels.
        queries_file: queries (TSV or BEIR JSONL); required by id triples and qrels, optional for groups.
        qrels_file: qrels (TREC or BEIR TSV); qrels format only.
        min_relevance: the smallest grade that counts as a positive (qrels format).
        cache_dir: datasets cache directory; ``None`` uses the datasets default.

    Returns:
        A :class:`TrainData`.

    Raises:
        InputError: unknown format, missing or unused files, and every bad line (file, line, id).
    """
    fmt, reason = _resolve_format(train_file, format, corpus_file, queries_file, qrels_file)
    logger.info("train data format: %s (%s)", fmt, reason)
    files = {"train_file": train_file, "corpus_file": corpus_file, "queries_file": queries_file}
    files = {
        k: (None if v is None else _existing_file(v)) for k, v in {**files, "qrels_file": qrels_file}.items()
    }
    # a tuple: datasets shards a generator over every *list* in gen_kwargs
    stamps = tuple(_stamp(path) for path in files.values() if path is not None)
    module_hash = hashlib.sha256(
        Path(__file__).read_bytes() + Path(data_mod.__file__).read_bytes()
    ).hexdigest()
    if files["corpus_file"] is not None:
        corpus = read_collection(files["corpus_file"], cache_dir=cache_dir)
    else:
        corpus_kwargs = {"path": files["train_file"], "fmt": fmt, "stamps": stamps, "code": module_hash}
        corpus = _from_generator(_generate_corpus, corpus_kwargs, cache_dir=cache_dir)
    group_kwargs = {**files, "fmt": fmt, "min_relevance": min_relevance, "cache_dir": cache_dir}
    group_kwargs.update(stamps=stamps, code=module_hash)
    groups = _from_generator(_generate_groups, group_kwargs, cache_dir=cache_dir, features=GROUP_FEATURES)
    logger.info("training data: %d query groups over %d corpus documents", len(groups), len(corpus))
    return TrainData(corpus=corpus, groups=groups)


def _resolve_format(
    train_file: Any, format: str, corpus_file: Any, queries_file: Any, qrels_file: Any
) -> tuple[str, str]:
    """The internal format (``tevatron | groups | text-triples | id-triples | qrels``) and why."""
    if format not in FORMATS:
        raise InputError(f"unknown train data format {format!r}; expected one of {', '.join(FORMATS)}")
    reason = f"format={format!r}"
    if format == "auto":
        if train_file is None:
            format, reason = "qrels", "auto: no train_file"
        else:
            format, reason = _sniff(_existing_file(train_file))
    if format == "qrels":
        if train_file is not None:
            raise InputError(
                "the qrels format takes no train_file (positives come from qrels_file)", path=train_file
            )
        needed = {"queries_file": queries_file, "qrels_file": qrels_file, "corpus_file": corpus_file}
        missing = [name for name, value in needed.items() if value is None]
        if missing:
            raise InputError(
                f"the qrels format needs queries_file, qrels_file and corpus_file; missing: {missing}"
            )
        return "qrels", reason
    if train_file is None:
        raise InputError(f"the {format} format needs a train_file")
    if qrels_file is not None:
        raise InputError(f"qrels_file is used only by the qrels format, not by {format}", path=qrels_file)
    if format == "tevatron" and queries_file is not None:
        raise InputError(
            "queries_file is not used by the tevatron format (each line has its query)", path=queries_file
        )
    if format == "groups" and corpus_file is None:
        raise InputError("the groups format needs corpus_file (its lines hold document ids)", path=train_file)
    if format == "triples":
        if (corpus_file is None) != (queries_file is None):
            raise InputError(
                "triples: give both corpus_file and queries_file (id triples qid<TAB>pid<TAB>nid) or neither "
                "(text triples query<TAB>positive<TAB>negative)",
                path=train_file,
            )
        format = "id-triples" if corpus_file is not None else "text-triples"
        reason += ", ids because corpus_file and queries_file are given" if corpus_file else ", texts"
    return format, reason


def _sniff(path: str) -> tuple[str, str]:
    """Auto-detect: the suffix says JSON lines or TSV, the first non-blank line says which kind."""
    lineno, line = next(iter(_iter_lines(path)), (None, None))
    if line is None:
        raise InputError("empty file: no non-blank line", path=path)
    name = path.lower()
    is_json = name.endswith(_JSON_SUFFIXES) or (
        not name.endswith(_TSV_SUFFIXES) and line.lstrip().startswith("{")
    )
    if not is_json:
        num_cols = len(line.split("\t"))
        if num_cols != 3:
            raise InputError(
                f"cannot detect the format: expected 3 tab-separated columns (triples), found {num_cols}",
                path=path,
                line=lineno,
            )
        return "triples", f"auto: 3 tab-separated columns on line {lineno}"
    obj = _json_object(line, path, lineno)
    if "positive_passages" in obj:
        return "tevatron", f"auto: JSON key 'positive_passages' on line {lineno}"
    if "positive_ids" in obj:
        return "groups", f"auto: JSON key 'positive_ids' on line {lineno}"
    raise InputError(
        "cannot detect the format: expected a key 'positive_passages' (tevatron) or 'positive_ids' "
        f"(groups), found {sorted(obj)[:8]}",
        path=path,
        line=lineno,
    )


def _stamp(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


def _from_generator(
    generator: Any,
    gen_kwargs: dict[str, Any],
    *,
    cache_dir: str | None,
    features: datasets.Features | None = None,
) -> datasets.Dataset:
    """``Dataset.from_generator`` that re-raises the InputError that datasets wrapped."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, cache_dir=cache_dir, gen_kwargs=gen_kwargs
        )
    except Exception as err:
        cause = _input_error_in_chain(err)
        if cause is None:
            raise
        raise cause from None


# --- reading lines into records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    """A passage given by its text (Tevatron, text triples); ``docid`` None means "identify by content"."""

    docid: str | None
    title: str
    text: str


@dataclass
class _Record:
    """One line: a query (id and/or text) with document references (string ids or ``_Doc``)."""

    line: int
    query_id: str | None
    query: str | None
    positives: list[Any]
    negatives: list[Any]


def _records(path: str, fmt: str) -> Iterator[_Record]:
    """Parse every non-blank line of a tevatron, groups or triples file; each needs a positive."""
    parse = {"tevatron": _tevatron_record, "groups": _groups_record}.get(fmt, _triple_record)
    num_lines = 0
    for lineno, line in _iter_lines(path):
        num_lines += 1
        record = parse(line, path, lineno, fmt)
        if not record.positives:
            query = record.query_id if record.query_id is not None else record.query
            raise InputError(f"no positive for query {query!r}", path=path, line=lineno)
        yield record
    if num_lines == 0:
        raise InputError("empty file: no non-blank line", path=path)


def _json_object(line: str, path: str, lineno: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg} at column {err.colno}", path=path, line=lineno) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, found {type(obj).__name__}", path=path, line=lineno)
    return obj


def _get(obj: dict[str, Any], key: str, kind: type, path: str, lineno: int, *, required: bool) -> Any:
    """``obj[key]`` checked to be a ``kind`` (``None``/absent allowed unless ``required``)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise InputError(f"missing key {key!r} (keys: {sorted(obj)[:8]})", path=path, line=lineno)
        return None
    if kind is str and isinstance(value, int) and not isinstance(value, bool) and key.endswith(("id", "ids")):
        value = str(value)
    if not isinstance(value, kind):
        raise InputError(f"{key!r} must be a {kind.__name__}, found {value!r:.60}", path=path, line=lineno)
    if kind is str and not value.strip() and key in ("query", "query_id", "docid"):
        raise InputError(f"empty {key!r}", path=path, line=lineno)
    return value


def _id_list(obj: dict[str, Any], key: str, path: str, lineno: int, *, required: bool) -> list[str]:
    ids = []
    for value in _get(obj, key, list, path, lineno, required=required) or []:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(
                f"{key!r}: ids must be non-empty strings, found {value!r:.60}", path=path, line=lineno
            )
        ids.append(value)
    return ids


def _passages(obj: dict[str, Any], key: str, path: str, lineno: int, *, required: bool) -> list[_Doc]:
    docs = []
    for passage in _get(obj, key, list, path, lineno, required=required) or []:
        if not isinstance(passage, dict):
            raise InputError(f"{key!r}: expected JSON objects, found {passage!r:.60}", path=path, line=lineno)
        text = _get(passage, "text", str, path, lineno, required=True)
        title = _get(passage, "title", str, path, lineno, required=False) or ""
        docid = _get(passage, "docid", str, path, lineno, required=False)
        if not (title.strip() or text.strip()):
            raise InputError(f"{key!r}: empty text (and no title), docid {docid!r}", path=path, line=lineno)
        docs.append(_Doc(docid, title, text))
    return docs


def _tevatron_record(line: str, path: str, lineno: int, fmt: str) -> _Record:
    obj = _json_object(line, path, lineno)
    return _Record(
        lineno,
        _get(obj, "query_id", str, path, lineno, required=False),
        _get(obj, "query", str, path, lineno, required=True),
        _passages(obj, "positive_passages", path, lineno, required=True),
        _passages(obj, "negative_passages", path, lineno, required=False),
    )


def _groups_record(line: str, path: str, lineno: int, fmt: str) -> _Record:
    obj = _json_object(line, path, lineno)
    return _Record(
        lineno,
        _get(obj, "query_id", str, path, lineno, required=True),
        _get(obj, "query", str, path, lineno, required=False),
        _id_list(obj, "positive_ids", path, lineno, required=True),
        _id_list(obj, "negative_ids", path, lineno, required=False),
    )


def _triple_record(line: str, path: str, lineno: int, fmt: str) -> _Record:
    cols = line.split("\t")
    if len(cols) != 3:
        raise InputError(f"expected 3 tab-separated columns, found {len(cols)}", path=path, line=lineno)
    for name, col in zip(("query", "positive", "negative"), cols, strict=True):
        if not col.strip():
            raise InputError(f"empty {name} column", path=path, line=lineno)
    if fmt == "id-triples":
        return _Record(lineno, cols[0], None, [cols[1]], [cols[2]])
    return _Record(lineno, None, cols[0], [_Doc(None, "", cols[1])], [_Doc(None, "", cols[2])])


# --- resolving ids to rows, grouping -----------------------------------------------------------------------


class _CorpusRows:
    """Doc id -> corpus row through one dict built once (~120 bytes per id: ~1 GB for MS MARCO's 8.8M ids)."""

    def __init__(self, corpus: datasets.Dataset, corpus_path: str):
        ids = corpus.data.column("id").to_pylist()  # a fresh read_collection dataset: no indices mapping
        self.rows = dict(zip(ids, range(len(ids)), strict=True))
        self.corpus_path = corpus_path

    def row(self, ref: str | _Doc, path: str, lineno: int | None) -> int:
        doc_id = ref
        if isinstance(ref, _Doc):
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


class _NewDocs:
    """Rows for the passages of the train file itself, numbered in order of first appearance.

    Keyed by docid, or by the content digest when there is none (~130 bytes per distinct passage).
    """

    def __init__(self) -> None:
        self.rows: dict[str | bytes, int] = {}
        self.digests = bytearray()  # _DIGEST_SIZE bytes per row: catches one docid used for two texts
        self.lines = array("q")  # first line of each row

    def add(self, doc: _Doc, path: str, lineno: int) -> tuple[int, bool]:
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

    def row(self, doc: _Doc, path: str, lineno: int) -> int:
        return self.add(doc, path, lineno)[0]


class _Groups:
    """Query -> group number (order of first appearance) and the (group, row) pairs, 8 bytes each."""

    def __init__(self, query_texts: dict[str, str] | None, queries_path: str | None):
        self.query_texts, self.queries_path = query_texts, queries_path
        self.number: dict[str, int] = {}
        self.query_ids: list[str] = []
        self.queries: list[str] = []
        self.lines = array("q")  # first line of each group
        self.num_records = 0
        self.pos, self.neg = array("q"), array("q")  # (group << 32) | row: corpus rows < 2^32

    def add(self, record: _Record, path: str, rows: _CorpusRows | _NewDocs) -> None:
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
            self.num_records, num_groups, len(pos_rows), len(neg_rows),
            len(pos_keys) + len(neg_keys) - len(pos_rows) - len(neg_rows) - num_dropped, num_dropped,
        )  # fmt: skip
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


def _query_texts(queries_file: str, cache_dir: str | None) -> dict[str, str]:
    """Query id -> text (about 150 bytes per query: ~120 MB for MS MARCO's 800k training queries)."""
    queries = data_mod.read_queries(queries_file, cache_dir=cache_dir)
    table = queries.data
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def _generate_corpus(path: str, fmt: str, stamps: tuple, code: str) -> Iterator[dict[str, str]]:
    """Corpus rows: the distinct passages of a Tevatron or text-triples file, in order of first appearance."""
    del stamps, code  # fingerprint only
    docs = _NewDocs()
    for record in _records(path, fmt):
        for doc in (*record.positives, *record.negatives):
            _, is_new = docs.add(doc, path, record.line)
            if is_new:
                doc_id = doc.docid if doc.docid is not None else text_id(doc.title, doc.text)
                yield {"id": doc_id, "title": doc.title, "text": doc.text}


def _generate_groups(
    fmt: str,
    train_file: str | None,
    corpus_file: str | None,
    queries_file: str | None,
    qrels_file: str | None,
    min_relevance: int,
    cache_dir: str | None,
    stamps: tuple,
    code: str,
) -> Iterator[dict[str, Any]]:
    """Group rows for every format (datasets caches them; the file is read again only when it changed)."""
    del stamps, code  # fingerprint only
    if fmt == "qrels":
        yield from _qrels_groups(qrels_file, queries_file, corpus_file, min_relevance, cache_dir)
        return
    rows: _CorpusRows | _NewDocs = _NewDocs()
    if corpus_file is not None:
        rows = _CorpusRows(read_collection(corpus_file, cache_dir=cache_dir), corpus_file)
    query_texts = None if queries_file is None else _query_texts(queries_file, cache_dir)
    groups = _Groups(query_texts, queries_file)
    for record in _records(train_file, fmt):
        groups.add(record, train_file, rows)
    yield from groups.rows()


def _qrels_groups(
    qrels_file: str, queries_file: str, corpus_file: str, min_relevance: int, cache_dir: str | None
) -> Iterator[dict[str, Any]]:
    """One group per judged query with a grade >= ``min_relevance``; no negatives."""
    qrels = data_mod.read_qrels(qrels_file)
    query_texts = _query_texts(queries_file, cache_dir)
    rows = _CorpusRows(read_collection(corpus_file, cache_dir=cache_dir), corpus_file)
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
        unknown = next((doc_id for doc_id in positive_ids if doc_id not in rows.rows), None)
        if unknown is not None:
            line = _qrels_line(qrels_file, query_id, unknown)
            raise InputError(
                f"doc id {unknown!r} is not in the corpus {corpus_file}", path=qrels_file, line=line
            )
        positives = [rows.rows[doc_id] for doc_id in positive_ids]
        num_groups += 1
        yield {"query_id": query_id, "query": query, "positives": positives, "negatives": []}
    logger.info(
        "qrels: %d of %d judged queries have a grade >= %d (the others are skipped)",
        num_groups, len(qrels), min_relevance,
    )  # fmt: skip
    if num_groups == 0:
        raise InputError(f"no query has a judgment with grade >= {min_relevance}", path=qrels_file)


def _qrels_line(path: str, query_id: str, doc_id: str | None) -> int | None:
    """The first line of ``path`` that judges ``query_id`` (and ``doc_id``); error path only."""
    for lineno, line in _iter_lines(path):
        cols = line.split()
        if cols and cols[0] == query_id and (doc_id is None or doc_id in cols[1:-1]):
            return lineno
    return None


# --- sampling and collation --------------------------------------------------------------------------------


class GroupDataset(torch.utils.data.Dataset):
    """One item per query group: a positive and negatives drawn deterministically from (seed, epoch, idx).

    Each item holds ``group_size`` documents: one positive, drawn uniformly among the query's positives, then
    ``group_size - 1`` negatives, drawn uniformly without replacement when the group has enough, with
    replacement otherwise (logged once). The draw uses ``numpy.random.default_rng([seed, epoch, idx])`` only,
    so it ignores the global RNG state and a resumed run draws the same documents. Call :meth:`set_epoch` each
    epoch (with persistent DataLoader workers the workers keep their own copy: recreate them instead).

    Args:
        data: the training data.
        group_size: documents per query, G = 1 positive + (G - 1) negatives (Tevatron's ``train_group_size``).
        seed: non-negative seed.

    Raises:
        InputError: ``group_size < 1``, a negative seed, or G > 1 and a group without negatives.
    """

    def __init__(self, data: TrainData, group_size: int, *, seed: int = 0):
        if group_size < 1:
            raise InputError(f"train_group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.groups = data.groups.with_format(None)
        self.group_size, self.seed, self.epoch = group_size, seed, 0
        if group_size > 1:
            table = self.groups.with_format("arrow")[:]
            num_neg = pc.list_value_length(table.column("negatives")).to_numpy()  # (N,)
            empty = np.flatnonzero(num_neg == 0)
            if len(empty):
                query_id = table.column("query_id")[int(empty[0])].as_py()
                raise InputError(
                    f"query id {query_id!r} (and {len(empty) - 1} more queries) has no negatives, but "
                    f"train_group_size={group_size} needs {group_size - 1} per query: use train_group_size=1 "
                    "(in-batch / cache negatives only) or mine hard negatives with `dualenc mine`"
                )
            num_short = int((num_neg < group_size - 1).sum())
            if num_short:
                logger.warning(
                    "%d of %d query groups have fewer than %d negatives: theirs are drawn with replacement",
                    num_short, len(num_neg), group_size - 1,
                )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``{"query": str, "doc_idx": [positive, *negatives] (len G), "positives": all positive rows}``."""
        group = self.groups[int(idx)]
        positives, negatives = group["positives"], group["negatives"]
        rng = np.random.default_rng([self.seed, self.epoch, int(idx)])
        doc_idx = [positives[int(rng.integers(len(positives)))]]
        num_neg = self.group_size - 1
        if num_neg:
            picks = rng.choice(len(negatives), size=num_neg, replace=len(negatives) < num_neg)  # (G - 1,)
            doc_idx += [negatives[int(i)] for i in picks]
        return {"query": group["query"], "doc_idx": doc_idx, "positives": list(positives)}


class TrainCollator:
    """Batch of :class:`GroupDataset` items -> tokenized queries and documents plus row indices.

    Args:
        model: anything with ``tokenize_queries(list[str])`` and ``tokenize_docs(list[str])`` returning a
            ``BatchEncoding`` (e.g. :class:`dualenc.encoder.DualEncoder`).
        corpus: the corpus of the :class:`TrainData`.

    Returns (from ``__call__``):
        ``{"query": BatchEncoding (B, Lq), "doc": BatchEncoding (B*G, Ld), "doc_idx": LongTensor (B*G,),
        "positives": LongTensor (B, P_max) padded with -1}``. Query ``i``'s documents are rows
        ``i*G .. i*G+G-1`` of ``doc``, its positive first. Document text is ``doc_text(title, text)``.
    """

    def __init__(self, model: Any, corpus: datasets.Dataset):
        self.model = model
        self.corpus = corpus.with_format(None)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("empty batch")
        group_size = len(items[0]["doc_idx"])
        if any(len(item["doc_idx"]) != group_size for item in items):
            raise ValueError("every item of a batch needs the same number of documents")
        doc_idx = [int(row) for item in items for row in item["doc_idx"]]  # (B*G,)
        docs = self.corpus[doc_idx]  # one batched Arrow take
        texts = [doc_text(title, text) for title, text in zip(docs["title"], docs["text"], strict=True)]
        num_pos = max(len(item["positives"]) for item in items)
        positives = torch.full((len(items), num_pos), -1, dtype=torch.long)  # (B, P_max)
        for i, item in enumerate(items):
            positives[i, : len(item["positives"])] = torch.as_tensor(item["positives"], dtype=torch.long)
        return {
            "query": self.model.tokenize_queries([item["query"] for item in items]),  # (B, Lq)
            "doc": self.model.tokenize_docs(texts),  # (B*G, Ld)
            "doc_idx": torch.tensor(doc_idx, dtype=torch.long),  # (B*G,)
            "positives": positives,
        }
