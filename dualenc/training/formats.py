"""Training-data formats: auto-detection, the files each format needs, and one parser per format.

:func:`dualenc.training.data.load_train_data` reads these (``format=...``; ``"auto"`` picks one from the
suffix and the first line, and logs which):

- ``tevatron``: JSONL ``{"query_id"?, "query", "positive_passages": [{"docid"?, "title"?, "text"}, ...],
  "negative_passages"?: [...]}`` (Tevatron's training format). With ``corpus_file`` every passage needs a
  ``docid`` of that corpus; without it the corpus is the file's distinct passages in order of first
  appearance, keyed by ``docid`` or, without one, by :func:`dualenc.training.groups.text_id` of title and
  text.
- ``groups``: JSONL ``{"query_id", "query"?, "positive_ids": [...], "negative_ids"?: [...]}`` (what
  :mod:`dualenc.retrieval.mine` writes) against ``corpus_file``; ``queries_file`` supplies a missing
  ``"query"``.
- ``triples``: TSV, 3 columns: ``query<TAB>positive<TAB>negative`` texts (MS MARCO
  ``triples.train.small.tsv``) or, when ``corpus_file`` and ``queries_file`` are both given, ids
  ``qid<TAB>pid<TAB>nid`` (qidpidtriples).
- ``qrels``: no train file; ``queries_file`` + ``qrels_file`` + ``corpus_file``. Positives are the judged
  documents with grade >= ``min_relevance``; no negatives (in-batch or cache training).

Each line of a tevatron, groups or triples file becomes one :class:`Record` (documents as string ids or
:class:`Doc` texts); resolving them to corpus rows and merging them per query is
:mod:`dualenc.training.groups`'s job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dualenc.errors import InputError
from dualenc.io.input_files import iter_lines

logger = logging.getLogger(__name__)

TRAIN_FORMATS = ("auto", "tevatron", "groups", "triples", "qrels")  # what a user may name
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_TSV_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")


def check_files(
    fmt: str, reason: str, train_file: Any, corpus_file: Any, queries_file: Any, qrels_file: Any
) -> tuple[str, str]:
    """Check that format ``fmt`` (not ``auto``) gets the files it needs and none it ignores.

    Returns:
        The internal format (``tevatron | groups | text-triples | id-triples | qrels``) and ``reason``,
        extended with why when triples are read as ids or texts.
    """
    if fmt == "qrels":
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
        raise InputError(f"the {fmt} format needs a train_file")
    if qrels_file is not None:
        raise InputError(f"qrels_file is used only by the qrels format, not by {fmt}", path=qrels_file)
    if fmt == "tevatron" and queries_file is not None:
        raise InputError(
            "queries_file is not used by the tevatron format (each line has its query)", path=queries_file
        )
    if fmt == "groups" and corpus_file is None:
        raise InputError("the groups format needs corpus_file (its lines hold document ids)", path=train_file)
    if fmt == "triples":
        if (corpus_file is None) != (queries_file is None):
            raise InputError(
                "triples: give both corpus_file and queries_file (id triples qid<TAB>pid<TAB>nid) or neither "
                "(text triples query<TAB>positive<TAB>negative)",
                path=train_file,
            )
        fmt = "id-triples" if corpus_file is not None else "text-triples"
        reason += ", ids because corpus_file and queries_file are given" if corpus_file else ", texts"
    return fmt, reason


def sniff(path: str) -> tuple[str, str]:
    """Auto-detect: the suffix says JSON lines or TSV, the first non-blank line says which kind."""
    lineno, line = next(iter(iter_lines(path)), (None, None))
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


# --- reading lines into records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """A passage given by its text (Tevatron, text triples); ``docid`` None means "identify by content"."""

    docid: str | None
    title: str
    text: str


@dataclass
class Record:
    """One line: a query (id and/or text) with document references (string ids or ``Doc``)."""

    line: int
    query_id: str | None
    query: str | None
    positives: list[Any]
    negatives: list[Any]


def records(path: str, fmt: str) -> Iterator[Record]:
    """Parse every non-blank line of a tevatron, groups or triples file; each needs a positive."""
    parse = {"tevatron": _tevatron_record, "groups": _groups_record}.get(fmt, _triple_record)
    num_lines = 0
    for lineno, line in iter_lines(path):
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


def _passages(obj: dict[str, Any], key: str, path: str, lineno: int, *, required: bool) -> list[Doc]:
    docs = []
    for passage in _get(obj, key, list, path, lineno, required=required) or []:
        if not isinstance(passage, dict):
            raise InputError(f"{key!r}: expected JSON objects, found {passage!r:.60}", path=path, line=lineno)
        text = _get(passage, "text", str, path, lineno, required=True)
        title = _get(passage, "title", str, path, lineno, required=False) or ""
        docid = _get(passage, "docid", str, path, lineno, required=False)
        if not (title.strip() or text.strip()):
            raise InputError(f"{key!r}: empty text (and no title), docid {docid!r}", path=path, line=lineno)
        docs.append(Doc(docid, title, text))
    return docs


def _tevatron_record(line: str, path: str, lineno: int, fmt: str) -> Record:
    obj = _json_object(line, path, lineno)
    return Record(
        lineno,
        _get(obj, "query_id", str, path, lineno, required=False),
        _get(obj, "query", str, path, lineno, required=True),
        _passages(obj, "positive_passages", path, lineno, required=True),
        _passages(obj, "negative_passages", path, lineno, required=False),
    )


def _groups_record(line: str, path: str, lineno: int, fmt: str) -> Record:
    obj = _json_object(line, path, lineno)
    return Record(
        lineno,
        _get(obj, "query_id", str, path, lineno, required=True),
        _get(obj, "query", str, path, lineno, required=False),
        _id_list(obj, "positive_ids", path, lineno, required=True),
        _id_list(obj, "negative_ids", path, lineno, required=False),
    )


def _triple_record(line: str, path: str, lineno: int, fmt: str) -> Record:
    cols = line.split("\t")
    if len(cols) != 3:
        raise InputError(f"expected 3 tab-separated columns, found {len(cols)}", path=path, line=lineno)
    for name, col in zip(("query", "positive", "negative"), cols, strict=True):
        if not col.strip():
            raise InputError(f"empty {name} column", path=path, line=lineno)
    if fmt == "id-triples":
        return Record(lineno, cols[0], None, [cols[1]], [cols[2]])
    return Record(lineno, None, cols[0], [Doc(None, "", cols[1])], [Doc(None, "", cols[2])])
