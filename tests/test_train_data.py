"""Training data: four formats on inline files, merging, every bad input, caching, real data."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
from helpers import TINY_CORPUS, jsonl, write

from dualenc.errors import InputError
from dualenc.io.readers import read_collection
from dualenc.training import data as train_data
from dualenc.training.data import TrainData, group_features, load_train_data


def sha_id(title: str, text: str) -> str:
    """The documented stable id of an id-less passage or query, computed here independently."""
    return hashlib.blake2b(f"{title}\x00{text}".encode(), digest_size=12).hexdigest()


def as_ids(data: TrainData) -> list[tuple[str, str, list[str], list[str]]]:
    """Groups with rows mapped back to corpus ids: (query_id, query, positive ids, negative ids)."""
    ids = list(data.corpus["id"])
    groups = []
    for g in data.groups:
        groups.append(
            (g["query_id"], g["query"], [ids[r] for r in g["positives"]], [ids[r] for r in g["negatives"]])
        )
    return groups


def corpus_rows(data: TrainData) -> list[tuple[str, str, str]]:
    return [(r["id"], r["title"], r["text"]) for r in data.corpus]


# --- tevatron ---------------------------------------------------------------------------------------------

TEV = jsonl(
    {
        "query_id": "q1",
        "query": "alpha",
        "positive_passages": [{"docid": "d1", "title": "T1", "text": "one"}],
        "negative_passages": [{"docid": "d2", "text": "two"}, {"docid": "d3", "title": "", "text": "three"}],
    },
    {
        "query_id": "q2",
        "query": "beta",
        "positive_passages": [{"docid": "d3", "title": None, "text": "three"}],
        "negative_passages": [{"docid": "d1", "title": "T1", "text": "one"}],
    },
)


def test_tevatron_with_docids_builds_the_corpus_from_the_file(tmp_path, hf, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    data = load_train_data(write(tmp_path / "train.jsonl", TEV), cache_dir=hf)
    assert "train data format: tevatron" in caplog.text
    assert corpus_rows(data) == [("d1", "T1", "one"), ("d2", "", "two"), ("d3", "", "three")]
    assert [dict(g) for g in data.groups] == [
        {"query_id": "q1", "query": "alpha", "positives": [0], "negatives": [1, 2]},
        {"query_id": "q2", "query": "beta", "positives": [2], "negatives": [0]},
    ]
    assert data.groups.features == group_features()
    assert data.positives_of(1) == [2] and data.doc_ids([2, 0]) == ["d3", "d1"]


def test_tevatron_without_ids_uses_content_hashes(tmp_path, hf):
    content = jsonl(
        {
            "query": "alpha",
            "positive_passages": [{"title": "T", "text": "x"}],
            "negative_passages": [{"text": "y"}],
        },
        {
            "query": "beta",
            "positive_passages": [{"text": "y"}],
            "negative_passages": [{"title": "T", "text": "x"}],
        },
        {"query": "alpha", "positive_passages": [{"title": "", "text": "z"}]},  # same query text: merged
    )
    data = load_train_data(write(tmp_path / "t.jsonl.gz", content), format="tevatron", cache_dir=hf)
    x, y, z = sha_id("T", "x"), sha_id("", "y"), sha_id("", "z")
    assert corpus_rows(data) == [(x, "T", "x"), (y, "", "y"), (z, "", "z")]
    assert as_ids(data) == [
        (sha_id("", "alpha"), "alpha", [x, z], [y]),
        (sha_id("", "beta"), "beta", [y], [x]),
    ]


def test_tevatron_with_corpus_file_uses_that_corpus(tmp_path, hf):
    corpus_file = write(tmp_path / "corpus.tsv", "d4\tF\tfour\n1\t\tone\nd2\t\ttwo\nd9\t\tunused\n")
    content = jsonl(
        {
            "query_id": "q9",
            "query": "a",
            "positive_passages": [{"docid": "d4", "text": "not compared"}],
            "negative_passages": [{"docid": "d2", "text": "t"}, {"docid": 1, "text": "an integer docid"}],
        },
    )
    data = load_train_data(write(tmp_path / "t.jsonl", content), corpus_file=corpus_file, cache_dir=hf)
    assert data.corpus.cache_files == read_collection(corpus_file, cache_dir=hf).cache_files
    assert corpus_rows(data) == [
        ("d4", "F", "four"),
        ("1", "", "one"),
        ("d2", "", "two"),
        ("d9", "", "unused"),
    ]
    assert [dict(g) for g in data.groups] == [
        {"query_id": "q9", "query": "a", "positives": [0], "negatives": [2, 1]}
    ]


# --- groups -----------------------------------------------------------------------------------------------


def test_groups_format_with_and_without_query_text(tmp_path, hf, files):
    content = jsonl(
        {"query_id": "q2", "positive_ids": ["d3"], "negative_ids": ["d5", "d1"]},
        {"query_id": "q7", "query": "own text", "positive_ids": ["d2", "d4"]},
        {
            "query_id": "q2",
            "positive_ids": ["d3", "d4"],
            "negative_ids": ["d1", "d2", "d4"],
        },  # merged with line 1
    )
    data = load_train_data(write(tmp_path / "g.jsonl", content), **files, cache_dir=hf)
    assert corpus_rows(data) == [tuple(line.split("\t")) for line in TINY_CORPUS.splitlines()]
    # q2: positives d3, d4 (union, first appearance); negatives d5, d1, d2; d4 dropped as a positive of q2
    assert as_ids(data) == [
        ("q2", "query two", ["d3", "d4"], ["d5", "d1", "d2"]),
        ("q7", "own text", ["d2", "d4"], []),
    ]
    assert data.groups[0]["positives"] == [2, 3] and data.groups[0]["negatives"] == [4, 0, 1]


def test_negatives_that_are_positives_are_dropped_and_counted(tmp_path, hf, files, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    content = jsonl(
        {"query_id": "q1", "positive_ids": ["d1", "d2"], "negative_ids": ["d2", "d3", "d1", "d3"]}
    )
    data = load_train_data(write(tmp_path / "g.jsonl", content), **files, cache_dir=hf)
    assert as_ids(data) == [("q1", "query one", ["d1", "d2"], ["d3"])]
    assert "dropped 2 negatives that are positives of the same query" in caplog.text


def test_positives_only_file_and_suffixless_auto_detection(tmp_path, hf, files, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    content = jsonl({"query_id": "q3", "positive_ids": ["d5", 4]})  # an integer id is its decimal text
    with pytest.raises(InputError, match="'4' is not in the corpus"):
        load_train_data(write(tmp_path / "train", content), **files, cache_dir=hf)
    assert "train data format: groups (auto: JSON key 'positive_ids' on line 1)" in caplog.text
    path = write(tmp_path / "train", jsonl({"query_id": "q3", "positive_ids": ["d5"]}))
    data = load_train_data(path, **files, cache_dir=hf)
    assert [dict(g) for g in data.groups] == [
        {"query_id": "q3", "query": "query three", "positives": [4], "negatives": []}
    ]


# --- triples ----------------------------------------------------------------------------------------------


def test_text_triples_merge_by_query_text(tmp_path, hf):
    content = "qa\tA\tB\nqb\tC\tA\nqa\tA\tD\nqa\tB\tE\n"
    data = load_train_data(write(tmp_path / "tri.tsv", content), cache_dir=hf)
    a, b, c, d, e = (sha_id("", t) for t in "ABCDE")
    assert [r[0] for r in corpus_rows(data)] == [a, b, c, d, e]  # order of first appearance
    assert [r[2] for r in corpus_rows(data)] == list("ABCDE")
    # qa: positives A, B (line 4); negatives B (dropped: a positive of qa), D, E
    assert as_ids(data) == [(sha_id("", "qa"), "qa", [a, b], [d, e]), (sha_id("", "qb"), "qb", [c], [a])]


def test_id_triples_against_corpus_and_queries(tmp_path, hf, files, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    content = "q3\td1\td2\nq1\td4\td2\nq3\td1\td5\nq3\td1\td2\n"
    data = load_train_data(write(tmp_path / "qidpid.tsv.gz", content), **files, cache_dir=hf)
    assert "train data format: id-triples" in caplog.text
    assert as_ids(data) == [("q3", "query three", ["d1"], ["d2", "d5"]), ("q1", "query one", ["d4"], ["d2"])]
    assert [dict(g)["negatives"] for g in data.groups] == [[1, 4], [1]]


def test_corpus_columns_name_a_tsv_layout_for_every_format(tmp_path, hf, files):
    """A corpus ``id<TAB>text<TAB>extra`` is read as (id, title, text) by the 3-column rule;
    ``corpus_columns`` says otherwise, for the corpus groups are read against and for the qrels format."""
    extra = write(tmp_path / "extra.tsv", "".join(f"d{i}\ttext {i}\tx{i}\n" for i in range(1, 6)))
    groups = write(
        tmp_path / "g.jsonl", jsonl({"query_id": "q1", "positive_ids": ["d2"], "negative_ids": ["d3"]})
    )
    qrels = write(tmp_path / "qrels.txt", "q1 0 d2 1\n")
    files = {**files, "corpus_file": extra}
    guessed = load_train_data(groups, **files, cache_dir=hf)
    assert corpus_rows(guessed)[1] == ("d2", "text 2", "x2")  # the stated 3-column rule: title, text
    for train_file, fmt in ((groups, "auto"), (None, "qrels")):
        data = load_train_data(
            train_file,
            format=fmt,
            **files,
            qrels_file=qrels if fmt == "qrels" else None,
            cache_dir=hf,
            corpus_columns="id,text,-",
        )
        assert corpus_rows(data)[1] == ("d2", "", "text 2")
        assert as_ids(data)[0][2] == ["d2"]


# --- qrels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "min_relevance, expected", [(1, [("q2", ["d3", "d1"]), ("q1", ["d5"])]), (2, [("q2", ["d1"])])]
)
def test_qrels_format(tmp_path, hf, files, min_relevance, expected, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    qrels = write(
        tmp_path / "qrels.txt", "q2 0 d3 1\nq2 0 d1 2\nq2 0 d2 0\nq1 0 d5 1\nq3 0 d4 0\nq3 0 nowhere 0\n"
    )
    data = load_train_data(qrels_file=qrels, min_relevance=min_relevance, **files, cache_dir=hf)
    assert "train data format: qrels" in caplog.text
    assert [(q, pos) for q, _, pos, _ in as_ids(data)] == expected
    assert all(g["negatives"] == [] for g in data.groups)
    assert data.groups[0]["query"] == "query two"


# --- caching ----------------------------------------------------------------------------------------------


def test_an_unchanged_file_is_read_from_the_cache_a_changed_one_again(tmp_path, hf, monkeypatch):
    path = write(tmp_path / "tri.tsv", "q\tA\tB\n")
    first = load_train_data(path, cache_dir=hf)

    def no_reading(*args, **kwargs):
        raise AssertionError("the train file was parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(train_data, "records", no_reading)
        again = load_train_data(path, cache_dir=hf)
    assert again.groups.cache_files == first.groups.cache_files and len(again.groups) == 1
    write(path, "q\tA\tB\nr\tC\tA\n")
    os.utime(path, ns=(1, 1))
    changed = load_train_data(path, cache_dir=hf)
    assert len(changed.groups) == 2 and len(changed.corpus) == 3


# --- bad input --------------------------------------------------------------------------------------------

T = {"query_id": "q1", "query": "a", "positive_passages": [{"docid": "d1", "text": "x"}]}
G = {"query_id": "q1", "positive_ids": ["d1"], "negative_ids": ["d2"]}
IDS = "corpus queries"


def case(name: str, file: str, content: str, line: int | None, *words: str, extra: str = ""):
    """A bad train file: the line the error must name and words its message must contain."""
    return pytest.param(file, content, extra.split(), line, words, id=name)


BAD_LINES = [
    case("json", "t.jsonl", jsonl(T) + "{oops\n", 2, "invalid JSON"),
    case("not_object", "t.jsonl", jsonl(T) + "[1]\n", 2, "JSON object", "list"),
    case("no_query", "t.jsonl", jsonl(T, {"positive_passages": [{"text": "y"}]}), 2, "'query'"),
    case("no_pos_key", "t.jsonl", jsonl(T, {"query": "b"}), 2, "'positive_passages'", extra="tevatron"),
    case(
        "no_pos",
        "t.jsonl",
        jsonl(T, {**T, "query_id": "q2", "positive_passages": []}),
        2,
        "no positive",
        "'q2'",
    ),
    case(
        "passage_type",
        "t.jsonl",
        jsonl(T, {**T, "negative_passages": ["d3"]}),
        2,
        "'negative_passages'",
        "d3",
    ),
    case("passage_text", "t.jsonl", jsonl({**T, "positive_passages": [{"docid": "d1"}]}), 1, "'text'"),
    case(
        "passage_empty",
        "t.jsonl",
        jsonl(T, {**T, "positive_passages": [{"docid": "d7", "text": " "}]}),
        2,
        "empty text",
        "'d7'",
    ),
    case(
        "docid_conflict",
        "t.jsonl",
        jsonl(T, {**T, "positive_passages": [{"docid": "d1", "text": "y"}]}),
        2,
        "'d1'",
        "line 1",
    ),
    case("query_conflict", "t.jsonl", jsonl(T, {**T, "query": "b"}), 2, "'q1'", "line 1"),
    case(
        "tev_unknown_doc",
        "t.jsonl",
        jsonl(T, {**T, "negative_passages": [{"docid": "d99", "text": "z"}]}),
        2,
        "'d99'",
        "corpus.tsv",
        extra="corpus",
    ),
    case(
        "tev_no_docid",
        "t.jsonl",
        jsonl({**T, "negative_passages": [{"text": "z"}]}),
        1,
        "no 'docid'",
        extra="corpus",
    ),
    case(
        "groups_unknown_doc",
        "g.jsonl",
        jsonl(G, {**G, "query_id": "q2", "negative_ids": ["d1x"]}),
        2,
        "'d1x'",
        "corpus.tsv",
        extra=IDS,
    ),
    case("groups_unknown_query", "g.jsonl", jsonl(G, {**G, "query_id": "q8"}), 2, "'q8'", "q.tsv", extra=IDS),
    case("groups_no_query_text", "g.jsonl", jsonl(G), 1, "'q1'", "no queries_file", extra="corpus"),
    case(
        "groups_ids_not_list",
        "g.jsonl",
        jsonl({**G, "positive_ids": "d1"}),
        1,
        "'positive_ids'",
        "list",
        extra=IDS,
    ),
    case("groups_id_type", "g.jsonl", jsonl({**G, "negative_ids": [1.5]}), 1, "1.5", extra=IDS),
    case(
        "groups_no_query_id",
        "g.jsonl",
        jsonl({"positive_ids": ["d1"]}),
        1,
        "'query_id'",
        extra="groups corpus",
    ),
    case("triple_columns", "tri.tsv", "q\tA\tB\nq\tA\n", 2, "3 tab-separated", "found 2"),
    case("triple_empty", "tri.tsv", "q\tA\tB\nq\t \tB\n", 2, "empty positive"),
    case("id_triple_query", "tri.tsv", "q1\td1\td2\nq9\td1\td2\n", 2, "'q9'", "q.tsv", extra=IDS),
    case("id_triple_doc", "tri.tsv", "q1\td1\td2\nq1\td1\tdd\n", 2, "'dd'", "corpus.tsv", extra=IDS),
    case("sniff_keys", "g.jsonl", jsonl({"query": "a", "pos": ["x"]}), 1, "cannot detect", "'pos'"),
    case("sniff_columns", "tri.tsv", "\nq\tA\n", 2, "cannot detect", "found 2"),
    case("empty_file", "tri.tsv", "\n \n", None, "empty file"),
]


@pytest.mark.parametrize("name, content, extra, line, words", BAD_LINES)
def test_bad_lines_name_file_line_and_value(tmp_path, hf, files, name, content, extra, line, words):
    path = write(tmp_path / name, content)
    kwargs = {key + "_file": files[key + "_file"] for key in ("corpus", "queries") if key in extra}
    fmt = next((e for e in extra if e in ("tevatron", "groups")), "auto")
    with pytest.raises(InputError) as err:
        load_train_data(path, format=fmt, cache_dir=hf, **kwargs)
    assert Path(err.value.path).resolve() == path.resolve() and err.value.line == line
    assert all(word in str(err.value) for word in words), str(err.value)


def test_bad_qrels_ids_name_the_qrels_line(tmp_path, hf, files):
    for content, line, word in [
        ("q1 0 d1 1\nq1 0 d77 1\n", 2, "'d77'"),
        ("q1 0 d1 1\n\nq5 0 d1 1\n", 3, "'q5'"),
    ]:
        qrels = write(tmp_path / "qrels.txt", content)
        with pytest.raises(InputError) as err:
            load_train_data(qrels_file=qrels, **files, cache_dir=hf)
        assert (Path(err.value.path), err.value.line) == (qrels.resolve(), line) and word in str(err.value)
    with pytest.raises(InputError, match="no query has a judgment with grade >= 3"):
        load_train_data(qrels_file=qrels, min_relevance=3, **files, cache_dir=hf)


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("unknown_format", {"format": "csv"}, "unknown train data format 'csv'"),
        ("qrels_with_train_file", {"format": "qrels"}, "takes no train_file"),
        ("groups_without_corpus", {"format": "groups"}, "needs corpus_file"),
        (
            "triples_half_ids",
            {"format": "triples", "corpus_file": "corpus"},
            "both corpus_file and queries_file",
        ),
        ("tevatron_queries", {"format": "tevatron", "queries_file": "queries"}, "not used by the tevatron"),
        ("qrels_file_unused", {"qrels_file": "corpus"}, "only by the qrels format"),
        ("no_train_file", {"format": "groups", "train": None}, "needs a train_file"),
        (
            "qrels_missing",
            {"train": None, "queries_file": "queries"},
            "missing: ['qrels_file', 'corpus_file']",
        ),
        ("missing_file", {"train": "nope.jsonl"}, "file not found"),
    ],
)
def test_bad_arguments(tmp_path, hf, files, name, kwargs, words):
    train = write(tmp_path / "tri.tsv", "q\tA\tB\n")
    kwargs = dict(kwargs)
    train = kwargs.pop("train", train)
    train = tmp_path / train if isinstance(train, str) else train
    kwargs = {k: (files[v + "_file"] if v in ("corpus", "queries") else v) for k, v in kwargs.items()}
    with pytest.raises(InputError) as err:
        load_train_data(train, cache_dir=hf, **kwargs)
    assert words in str(err.value)


# --- real data --------------------------------------------------------------------------------------------


def test_splade_toy_triples(shared_data, hf):
    path = shared_data / "msmarco-passage" / "text" / "splade-toy.triples.train.sample.tsv"
    lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    queries = list(dict.fromkeys(q for q, _, _ in lines))
    texts = list(dict.fromkeys(t for _, p, n in lines for t in (p, n)))
    data = load_train_data(path, cache_dir=hf)
    assert (len(data.groups), len(data.corpus)) == (len(queries), len(texts)) == (100, 146)
    assert list(data.corpus["text"]) == texts and list(data.groups["query"]) == queries
    corpus_text = list(data.corpus["text"])
    for group in data.groups:
        expected_pos = list(dict.fromkeys(p for q, p, _ in lines if q == group["query"]))
        expected_neg = [
            t for t in dict.fromkeys(n for q, _, n in lines if q == group["query"]) if t not in expected_pos
        ]
        assert [corpus_text[r] for r in group["positives"]] == expected_pos
        assert [corpus_text[r] for r in group["negatives"]] == expected_neg
