"""Training data: query groups whose positives and negatives are ROW indices of one corpus dataset.

Every document training can touch is a row of one corpus ``datasets.Dataset`` (``id``, ``title``, ``text``,
as :func:`dualenc.io.readers.read_collection` returns it). Groups name documents by row (``int64``), so the
negative cache can store rows, re-encode a row by reading the corpus, and mask a query's known positives by
row.

Formats (``load_train_data(format=...)``: ``auto | tevatron | groups | triples | qrels``) and their parsers
are in :mod:`dualenc.training.formats`; this module resolves ids to rows and groups lines per query.

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
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualenc.errors import InputError
from dualenc.io import input_files, qrels, readers
from dualenc.io.input_files import existing_file
from dualenc.io.qrels import read_qrels
from dualenc.io.readers import input_error_in_chain, read_collection
from dualenc.training import formats as train_formats
from dualenc.training import groups as groups_mod
from dualenc.training.formats import TRAIN_FORMATS, check_files, records, sniff
from dualenc.training.groups import CorpusRows, Groups, NewDocs, qrels_groups, text_id

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def group_features() -> datasets.Features:
    """The schema of the groups dataset: string query id and text, corpus rows of positives and negatives."""
    import datasets

    return datasets.Features(
        {
            "query_id": datasets.Value("string"),
            "query": datasets.Value("string"),
            "positives": datasets.Sequence(datasets.Value("int64")),
            "negatives": datasets.Sequence(datasets.Value("int64")),
        }
    )


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
    corpus_columns: str | None = None,
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
        corpus_columns: the TSV columns of ``corpus_file`` (e.g. ``"id,text,-"``); ``None``: 2 or 3 columns,
            or a header line (:func:`dualenc.io.readers.read_collection`).

    Returns:
        A :class:`TrainData`.

    Raises:
        InputError: unknown format, missing or unused files, and every bad line (file, line, id).
    """
    fmt, reason = _resolve_format(train_file, format, corpus_file, queries_file, qrels_file)
    logger.info("train data format: %s (%s)", fmt, reason)
    files = {"train_file": train_file, "corpus_file": corpus_file, "queries_file": queries_file}
    files = {
        k: (None if v is None else existing_file(v)) for k, v in {**files, "qrels_file": qrels_file}.items()
    }
    # a tuple: datasets shards a generator over every *list* in gen_kwargs
    stamps = tuple(_stamp(path) for path in files.values() if path is not None)
    # the parsing code is part of the cache fingerprint
    sources = [__file__, train_formats.__file__, groups_mod.__file__]
    sources += [readers.__file__, qrels.__file__, input_files.__file__]
    module_hash = hashlib.sha256(b"".join(Path(source).read_bytes() for source in sources)).hexdigest()
    if files["corpus_file"] is not None:
        corpus = read_collection(files["corpus_file"], cache_dir=cache_dir, columns=corpus_columns)
    else:
        corpus_kwargs = {"path": files["train_file"], "fmt": fmt, "stamps": stamps, "code": module_hash}
        corpus = _from_generator(_generate_corpus, corpus_kwargs, cache_dir=cache_dir)
    group_kwargs = {**files, "fmt": fmt, "min_relevance": min_relevance, "cache_dir": cache_dir}
    group_kwargs["corpus_columns"] = corpus_columns
    group_kwargs.update(stamps=stamps, code=module_hash)
    groups = _from_generator(_generate_groups, group_kwargs, cache_dir=cache_dir, features=group_features())
    logger.info("training data: %d query groups over %d corpus documents", len(groups), len(corpus))
    return TrainData(corpus=corpus, groups=groups)


def _resolve_format(
    train_file: Any, format: str, corpus_file: Any, queries_file: Any, qrels_file: Any
) -> tuple[str, str]:
    """The internal format (``tevatron | groups | text-triples | id-triples | qrels``) and why."""
    if format not in TRAIN_FORMATS:
        raise InputError(f"unknown train data format {format!r}; expected one of {', '.join(TRAIN_FORMATS)}")
    reason = f"format={format!r}"
    if format == "auto":
        if train_file is None:
            format, reason = "qrels", "auto: no train_file"
        else:
            format, reason = sniff(existing_file(train_file))
    return check_files(format, reason, train_file, corpus_file, queries_file, qrels_file)


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
    import datasets

    try:
        return datasets.Dataset.from_generator(
            generator, features=features, cache_dir=cache_dir, gen_kwargs=gen_kwargs
        )
    except Exception as err:
        cause = input_error_in_chain(err)
        if cause is None:
            raise
        raise cause from None


def _query_texts(queries_file: str, cache_dir: str | None) -> dict[str, str]:
    """Query id -> text (about 150 bytes per query: ~120 MB for MS MARCO's 800k training queries)."""
    queries = readers.read_queries(queries_file, cache_dir=cache_dir)
    table = queries.data
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def _generate_corpus(path: str, fmt: str, stamps: tuple, code: str) -> Iterator[dict[str, str]]:
    """Corpus rows: the distinct passages of a Tevatron or text-triples file, in order of first appearance."""
    del stamps, code  # fingerprint only
    docs = NewDocs()
    for record in records(path, fmt):
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
    corpus_columns: str | None,
    stamps: tuple,
    code: str,
) -> Iterator[dict[str, Any]]:
    """Group rows for every format (datasets caches them; the file is read again only when it changed)."""
    del stamps, code  # fingerprint only
    if fmt == "qrels":
        qrels = read_qrels(qrels_file)
        query_texts = _query_texts(queries_file, cache_dir)
        corpus = read_collection(corpus_file, cache_dir=cache_dir, columns=corpus_columns)
        doc_rows = CorpusRows(corpus, corpus_file).rows
        files = {"qrels_file": qrels_file, "queries_file": queries_file, "corpus_file": corpus_file}
        yield from qrels_groups(qrels, query_texts, doc_rows, min_relevance, **files)
        return
    rows: CorpusRows | NewDocs = NewDocs()
    if corpus_file is not None:
        corpus = read_collection(corpus_file, cache_dir=cache_dir, columns=corpus_columns)
        rows = CorpusRows(corpus, corpus_file)
    query_texts = None if queries_file is None else _query_texts(queries_file, cache_dir)
    groups = Groups(query_texts, queries_file)
    for record in records(train_file, fmt):
        groups.add(record, train_file, rows)
    yield from groups.rows()
