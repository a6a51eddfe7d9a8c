"""Readers of collections, queries, qrels: inline files in tmp_path, every bad input, the real data."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import datasets
import pytest

from dualenc.errors import InputError
from dualenc.io.qrels import read_qrels
from dualenc.io.readers import doc_text, doc_texts, read_collection, read_queries

STRING = datasets.Value("string")


def write(path: Path, content: str | bytes) -> Path:
    """Write ``content`` (UTF-8 if str) to ``path``, gzipped when the name ends in ``.gz``."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def rows(dataset: datasets.Dataset) -> list[dict]:
    return [dict(r) for r in dataset]


# --- good input -------------------------------------------------------------------------------------------


TSV2 = 'D-001\tfirst "quoted" passage\n007\t  second  passage \n10\tthird\n'
TSV2_ROWS = [
    {"id": "D-001", "title": "", "text": 'first "quoted" passage'},
    {"id": "007", "title": "", "text": "  second  passage "},
    {"id": "10", "title": "", "text": "third"},
]


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz", "c.txt"])
def test_collection_tsv_two_columns(tmp_path, hf, name):
    ds = read_collection(write(tmp_path / name, TSV2), cache_dir=hf)
    assert isinstance(ds, datasets.Dataset)
    assert ds.features == datasets.Features({"id": STRING, "title": STRING, "text": STRING})
    assert rows(ds) == TSV2_ROWS
    # backed by an Arrow file in the given cache dir, memory-mapped rather than held in memory
    assert ds.cache_files and all(f["filename"].startswith(hf) for f in ds.cache_files)


def test_collection_tsv_three_columns_crlf_bom_and_blank_lines(tmp_path, hf):
    content = "\ufeffD-001\tTitle One\tText one\r\n\r\n007\t\tno title\r\n   \n\t\n"
    ds = read_collection(write(tmp_path / "c.tsv", content), cache_dir=hf)
    assert rows(ds) == [
        {"id": "D-001", "title": "Title One", "text": "Text one"},
        {"id": "007", "title": "", "text": "no title"},
    ]


def test_collection_title_only_document_is_kept(tmp_path, hf):
    ds = read_collection(write(tmp_path / "c.tsv", "1\tA title\t \n"), cache_dir=hf)
    assert rows(ds) == [{"id": "1", "title": "A title", "text": " "}]


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_collection_beir_jsonl(tmp_path, hf, name):
    content = jsonl(
        {"_id": "D-001", "title": "T1", "text": "body one", "metadata": {"url": "x"}},
        {"_id": "007", "text": "no title key"},
        {"_id": "8", "title": None, "text": "null title"},
        {"_id": 42, "title": "", "text": "integer id"},
    )
    ds = read_collection(write(tmp_path / name, content), cache_dir=hf)
    assert ds.column_names == ["id", "title", "text"]
    assert rows(ds) == [
        {"id": "D-001", "title": "T1", "text": "body one"},
        {"id": "007", "title": "", "text": "no title key"},
        {"id": "8", "title": "", "text": "null title"},
        {"id": "42", "title": "", "text": "integer id"},
    ]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("q.tsv", "007\twhat is a dog\n\nQ-2\t how\n\n"),
        ("q.tsv.gz", "007\twhat is a dog\nQ-2\t how\n"),
        (
            "q.jsonl",
            jsonl({"_id": "007", "text": "what is a dog", "metadata": {}}, {"_id": "Q-2", "text": " how"}),
        ),
        ("q.jsonl.gz", jsonl({"_id": "007", "text": "what is a dog"}, {"_id": "Q-2", "text": " how"})),
    ],
)
def test_queries(tmp_path, hf, name, content):
    ds = read_queries(write(tmp_path / name, content), cache_dir=hf)
    assert ds.features == datasets.Features({"id": STRING, "text": STRING})
    assert rows(ds) == [{"id": "007", "text": "what is a dog"}, {"id": "Q-2", "text": " how"}]


QRELS_EXPECTED = {"007": {"D-001": 2, "0042": 0}, "Q-2": {"D-001": 1}}


@pytest.mark.parametrize(
    "content",
    [
        "007 Q0 D-001 2\n007 Q0 0042 0\n\nQ-2  Q0   D-001 1\n",  # TREC, spaces (DL19 style)
        "007\t0\tD-001\t2\n007\t0\t0042\t0\nQ-2\t0\tD-001\t1\n007\t0\tD-001\t2\n",  # tabs, same-grade dup
        "query-id\tcorpus-id\tscore\n007\tD-001\t2\n007\t0042\t0\nQ-2\tD-001\t1\n",  # BEIR with header
    ],
    ids=["trec-spaces", "trec-tabs", "beir"],
)
def test_qrels_layouts(tmp_path, content):
    assert read_qrels(write(tmp_path / "qrels.txt", content)) == QRELS_EXPECTED


def test_doc_text():
    assert doc_text("Title", "body") == "Title body"
    assert doc_text("", "body") == "body"
    assert doc_text("Title", "") == "Title"
    assert doc_text("  ", "body") == "body"
    assert doc_text(" Title", " body ") == " Title  body "  # nothing stripped when both have content


def test_doc_texts_of_a_dataset_a_batch_and_queries(tmp_path, hf):
    collection = read_collection(write(tmp_path / "c.tsv", "1\tTitle\tbody\n2\t \tonly body\n"), cache_dir=hf)
    assert doc_texts(collection) == ["Title body", "only body"]
    assert doc_texts(collection[1:2]) == ["only body"]
    assert doc_texts(collection[[1, 0]]) == ["only body", "Title body"]
    queries = read_queries(write(tmp_path / "q.tsv", "q1\tdense retrieval\n"), cache_dir=hf)
    assert doc_texts(queries) == doc_texts(queries[0:1]) == ["dense retrieval"]  # no title column


# --- cache ------------------------------------------------------------------------------------------------


def test_cached_call_reuses_the_arrow_file(tmp_path, hf):
    path = write(tmp_path / "c.tsv", TSV2)
    first = read_collection(path, cache_dir=hf)
    second = read_collection(path, cache_dir=hf)
    assert second.cache_files == first.cache_files
    assert rows(second) == TSV2_ROWS


def test_cache_invalidated_when_file_grows(tmp_path, hf):
    path = write(tmp_path / "c.tsv", TSV2)
    assert len(read_collection(path, cache_dir=hf)) == 3
    write(path, "1\tnew text\n")
    assert rows(read_collection(path, cache_dir=hf)) == [{"id": "1", "title": "", "text": "new text"}]


def test_cache_invalidated_when_same_size_file_changes(tmp_path, hf):
    path = write(tmp_path / "q.tsv", "1\taaaa\n")
    old_mtime = os.stat(path).st_mtime_ns
    assert rows(read_queries(path, cache_dir=hf)) == [{"id": "1", "text": "aaaa"}]
    write(path, "2\tbbbb\n")
    os.utime(path, ns=(old_mtime + 1_000_000, old_mtime + 1_000_000))  # coarse clocks: force a new mtime
    assert rows(read_queries(path, cache_dir=hf)) == [{"id": "2", "text": "bbbb"}]


def test_duplicate_ids_detected_on_cached_call_too(tmp_path, hf):
    path = write(tmp_path / "c.tsv", "1\ta\n1\tb\n")
    for _ in range(2):
        with pytest.raises(InputError, match="duplicate id '1'"):
            read_collection(path, cache_dir=hf)


# --- bad input: one case each; the message must name the file and the 1-based line -----------------------


BAD_TABLES = [
    # (id, reader, file name, content, expected line, words in the problem)
    ("columns-changed", "collection", "c.tsv", "1\ta\n\n2\tt\tb\n", 3, ["expected 2", "found 3"]),
    ("columns-first-line", "collection", "c.tsv", "1\ta\tb\tc\n", 1, ["2 (id, text) or 3", "found 4"]),
    ("columns-one", "collection", "c.tsv", "1\ta\n2 no tab\n", 2, ["expected 2", "found 1"]),
    ("columns-queries", "queries", "q.tsv", "1\ta\tb\n", 1, ["2 (id, text)", "found 3"]),
    ("empty-id", "collection", "c.tsv", "1\ta\n\tb\n", 2, ["empty id"]),
    ("empty-text", "collection", "c.tsv", "1\ta\n2\t  \n", 2, ["empty text", "'2'"]),
    ("empty-text-3col", "collection", "c.tsv", "1\tt\ta\n2\t \t \n", 2, ["empty text", "'2'"]),
    ("empty-query", "queries", "q.tsv", "1\ta\n\n\n007\t \n", 4, ["empty text", "'007'"]),
    (
        "duplicate",
        "collection",
        "c.tsv",
        "1\ta\n\n007\tb\n2\tc\n\n007\td\n",
        6,
        ["duplicate id '007'", "line 3"],
    ),
    ("duplicate-first-repeat", "queries", "q.tsv", "A\ta\nB\tb\n\nB\tc\nA\td\n", 4, ["'B'", "line 2"]),
    ("non-utf8", "collection", "c.tsv", b"1\ta\n2\tb\xff\xfec\n3\td\n", 2, ["UTF-8", "xff"]),
    ("non-utf8-gz", "queries", "q.tsv.gz", b"1\ta\n\n3\t\xe9t\xe9\n", 3, ["UTF-8"]),
    (
        "bad-json",
        "collection",
        "c.jsonl",
        '{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n',
        2,
        ["invalid JSON"],
    ),
    ("json-not-object", "queries", "q.jsonl", '{"_id": "1", "text": "a"}\n["2", "b"]\n', 2, ["JSON object"]),
    ("json-no-id", "collection", "c.jsonl", '{"_id": "1", "text": "a"}\n\n{"text": "b"}\n', 3, ["'_id'"]),
    ("json-no-text", "queries", "q.jsonl", '{"_id": "1", "title": "a"}\n', 1, ["'text'"]),
    (
        "json-text-not-str",
        "collection",
        "c.jsonl",
        '{"_id": "1", "text": 5}\n',
        1,
        ["'text' must be a string"],
    ),
    ("json-empty-id", "collection", "c.jsonl", '{"_id": "", "text": "a"}\n', 1, ["empty id"]),
    (
        "json-duplicate",
        "collection",
        "c.jsonl",
        jsonl({"_id": "x", "text": "a"}, {"_id": "x", "text": "b"}),
        2,
        ["duplicate id 'x'", "line 1"],
    ),
]


@pytest.mark.parametrize(
    ("kind", "name", "content", "line", "words"), [c[1:] for c in BAD_TABLES], ids=[c[0] for c in BAD_TABLES]
)
def test_bad_collection_or_queries(tmp_path, hf, kind, name, content, line, words):
    path = write(tmp_path / name, content)
    reader = read_collection if kind == "collection" else read_queries
    with pytest.raises(InputError) as err:
        reader(path, cache_dir=hf)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, message


BAD_QRELS = [
    ("trec-3-columns", "1 Q0 D1 1\n\n1 D2 1\n", 3, ["expected 4", "found 3"]),
    ("trec-5-columns", "1 Q0 D1 1 x\n", 1, ["expected 4", "found 5"]),
    ("beir-2-columns", "query-id\tcorpus-id\tscore\n1\tD1\t1\n1\tD2\n", 3, ["expected 3", "found 2"]),
    ("float-grade", "1 Q0 D1 1\n1 Q0 D2 1.0\n", 2, ["'1.0'", "not an integer"]),
    ("word-grade", "query-id\tcorpus-id\tscore\n1\tD1\thigh\n", 2, ["'high'", "not an integer"]),
    ("conflicting-duplicate", "007 0 D-001 1\n007 0 D-002 0\n\n007 0 D-001 2\n", 4, ["'D-001'", "line 1"]),
]


@pytest.mark.parametrize(
    ("content", "line", "words"), [c[1:] for c in BAD_QRELS], ids=[c[0] for c in BAD_QRELS]
)
def test_bad_qrels(tmp_path, content, line, words):
    path = write(tmp_path / "qrels.txt", content)
    with pytest.raises(InputError) as err:
        read_qrels(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("reader", ["collection", "queries", "qrels"])
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file(tmp_path, hf, reader, content):
    path = write(tmp_path / "empty.tsv", content)
    call = {
        "collection": lambda: read_collection(path, cache_dir=hf),
        "queries": lambda: read_queries(path, cache_dir=hf),
        "qrels": lambda: read_qrels(path),
    }[reader]
    with pytest.raises(InputError, match="empty file") as err:
        call()
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("reader", ["collection", "qrels"])
def test_an_error_names_the_file_as_the_caller_wrote_it(tmp_path, hf, monkeypatch, reader):
    """A relative path stays relative in the message (the user's own words), as the run reader does."""
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "bad.tsv", "a\tb\tc\td\n" if reader == "collection" else "1 Q0 D1\n")
    monkeypatch.chdir(tmp_path / "sub")
    call = {"collection": lambda p: read_collection(p, cache_dir=hf), "qrels": read_qrels}[reader]
    for given in ("bad.tsv", "../sub/bad.tsv"):
        with pytest.raises(InputError) as err:
            call(given)
        assert str(err.value).startswith(f"{given}:1: "), err.value


def test_empty_beir_qrels_after_header(tmp_path):
    path = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n\n")
    with pytest.raises(InputError, match="no judgments after the header"):
        read_qrels(path)


@pytest.mark.parametrize("reader", [read_collection, read_queries, read_qrels])
def test_missing_file(tmp_path, reader):
    path = tmp_path / "nope.tsv"
    with pytest.raises(InputError) as err:
        reader(path)
    assert str(err.value) == f"{path}: file not found"


def test_unknown_suffix(tmp_path, hf):
    path = write(tmp_path / "c.csv", "1,a\n")
    with pytest.raises(InputError, match=r"c\.csv: unknown file type"):
        read_collection(path, cache_dir=hf)


def test_corrupt_gzip(tmp_path, hf):
    path = tmp_path / "c.tsv.gz"
    path.write_bytes(b"1\tnot gzipped\n")
    with pytest.raises(InputError, match=r"c\.tsv\.gz: not a valid gzip file \(Not a gzipped file"):
        read_collection(path, cache_dir=hf)


def test_truncated_gzip(tmp_path, hf):
    data = gzip.compress("".join(f"{i}\tquery {i}\n" for i in range(5000)).encode())
    path = tmp_path / "q.tsv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"q\.tsv\.gz: not a valid gzip file \(.* after line (\d+)\)") as err:
        read_queries(path, cache_dir=hf)
    assert 1 < int(re.search(r"after line (\d+)", str(err.value)).group(1)) <= 5000


def test_garbled_gzip_is_not_reported_as_a_column_error(tmp_path, hf):
    """A stored (uncompressed) gzip block with a byte changed decompresses into a line without its tab; the
    stream's CRC only fails at its end. The reader must report the gzip file, not the line."""
    cases = [
        (
            "c.tsv.gz",
            "".join(f"{i}\tdocument {i}\n" for i in range(200)),
            b"50\t",
            lambda p: read_collection(p, cache_dir=hf),
        ),
        ("qrels.txt.gz", "".join(f"q{i} 0 d{i} 1\n" for i in range(200)), b"q50 ", read_qrels),
    ]
    for name, text, anchor, reader in cases:
        data = bytearray(gzip.compress(text.encode(), compresslevel=0))
        data[data.index(anchor) + len(anchor) - 1] = ord("X")  # line 51 loses a column separator
        path = tmp_path / name
        path.write_bytes(bytes(data))
        with pytest.raises(InputError) as err:
            reader(path)
        assert str(err.value).startswith(f"{path}: not a valid gzip file (CRC check failed"), err.value


def test_gzip_file_without_gz_suffix(tmp_path, hf):
    path = tmp_path / "c.tsv"
    path.write_bytes(gzip.compress(b"1\ta\n"))
    with pytest.raises(InputError, match=r"c\.tsv: the file is gzip-compressed but its name does not end"):
        read_collection(path, cache_dir=hf)


def test_tsv_columns_named_by_header_or_option(tmp_path, hf):
    dpr = write(tmp_path / "dpr.tsv", "id\ttext\ttitle\n1\tbody one\tTitle\n2\tbody two\t\n")
    assert rows(read_collection(dpr, cache_dir=hf)) == [
        {"id": "1", "title": "Title", "text": "body one"},
        {"id": "2", "title": "", "text": "body two"},
    ]
    extra = write(tmp_path / "extra.tsv", "1\tbody one\tx\ty\n2\tbody two\tx\ty\n")
    with pytest.raises(InputError, match=r"extra\.tsv:1: expected 2 \(id, text\) or 3 .*found 4; name the"):
        read_collection(extra, cache_dir=hf)
    assert rows(read_collection(extra, cache_dir=hf, columns="id,text,-,-")) == [
        {"id": "1", "title": "", "text": "body one"},
        {"id": "2", "title": "", "text": "body two"},
    ]
    queries = write(tmp_path / "q.tsv", "1\tfirst query\tsource\n")
    assert rows(read_queries(queries, cache_dir=hf, columns=["id", "text", "-"])) == [
        {"id": "1", "text": "first query"}
    ]
    with pytest.raises(InputError, match=r"extra\.tsv:2: expected 3 tab-separated columns .* found 4"):
        read_collection(
            write(tmp_path / "extra.tsv", "1\ta\tb\n2\ta\tb\tc\n"), cache_dir=hf, columns="id,text,-"
        )


@pytest.mark.parametrize(
    "columns, expected",
    [
        ("id,txt", "unknown column name 'txt'"),
        ("id,id,text", "'id' column exactly once"),
        ("title,text", "'id'"),
    ],
)
def test_bad_columns_option(tmp_path, hf, columns, expected):
    with pytest.raises(InputError, match=expected):
        read_collection(write(tmp_path / "c.tsv", "1\ta\n"), cache_dir=hf, columns=columns)


def test_error_is_not_cached(tmp_path, hf):
    path = write(tmp_path / "c.tsv", "1\t\n")
    with pytest.raises(InputError, match="empty text"):
        read_collection(path, cache_dir=hf)
    write(path, "1\tfixed\n")
    assert rows(read_collection(path, cache_dir=hf)) == [{"id": "1", "title": "", "text": "fixed"}]


# --- real data (counts from `wc -l` / `cut | sort -u` on the files) ----------------------------------------


def test_real_msmarco_subset_collection(shared_data, hf):
    ds = read_collection(shared_data / "msmarco-passage" / "collection.subset.tsv", cache_dir=hf)
    assert len(ds) == 31_490
    assert ds[0]["id"] == "0"
    assert ds[0]["text"].startswith("The presence of communication amid scientific minds")


def test_real_dl19_qrels_and_topics(shared_data, hf):
    qrels = read_qrels(shared_data / "msmarco-passage" / "qrels.dl19-passage.txt")
    assert len(qrels) == 43
    assert sum(len(docs) for docs in qrels.values()) == 9_260
    assert set(qrels["19335"].values()) <= {0, 1, 2, 3}
    topics = read_queries(shared_data / "msmarco-passage" / "topics.dl19-passage.txt", cache_dir=hf)
    assert set(topics["id"]) == set(qrels)


def test_real_topics(shared_data, hf):
    scifact = read_queries(shared_data / "scifact" / "topics.beir-v1.0.0-scifact.test.tsv.gz", cache_dir=hf)
    assert len(scifact) == 300
    scifact_qrels = read_qrels(shared_data / "scifact" / "qrels.beir-v1.0.0-scifact.test.txt")
    assert set(scifact["id"]) == set(scifact_qrels)
    assert sum(len(docs) for docs in scifact_qrels.values()) == 339
    dev = read_queries(
        shared_data / "msmarco-passage" / "topics.msmarco-passage.dev-subset.txt", cache_dir=hf
    )
    assert len(dev) == 6_980
    assert dev[1] == {"id": "2", "text": " Androgen receptor define"}  # text kept as written
