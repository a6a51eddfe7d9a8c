"""Run files: TREC / MS MARCO round trips, the deterministic tie order, and every bad-input case."""

from __future__ import annotations

import gzip

import ir_measures
import numpy as np
import pytest

from dualenc.errors import InputError
from dualenc.io.runs import read_run, run_from_search, sorted_hits, write_run

# String ids on purpose: "007" must stay "007", and "D10" < "D7" in string order.
RUN = {
    "q2": {"D7": 0.5, "007": 1.25, "D10": 0.5, "x": -3.0, "D1": 0.1 + 0.2},
    "q1": {"a": 2.0, "b": 2.0, "c": 2.0},
}


def test_sorted_hits_breaks_ties_by_doc_id_string_order():
    assert sorted_hits(RUN["q2"]) == [
        ("007", 1.25),
        ("D10", 0.5),
        ("D7", 0.5),
        ("D1", 0.1 + 0.2),
        ("x", -3.0),
    ]
    # Insertion order of the input does not matter.
    reversed_hits = dict(reversed(list(RUN["q2"].items())))
    assert sorted_hits(reversed_hits) == sorted_hits(RUN["q2"])


def test_trec_round_trip_and_exact_text(tmp_path):
    path = tmp_path / "run.trec"
    write_run(RUN, path, tag="t1")
    lines = path.read_text().splitlines()
    # Queries in dict order, ranks from 1, ties by doc id, repr floats.
    assert lines[:3] == ["q2 Q0 007 1 1.25 t1", "q2 Q0 D10 2 0.5 t1", "q2 Q0 D7 3 0.5 t1"]
    assert lines[3] == f"q2 Q0 D1 4 {0.1 + 0.2!r} t1"
    assert lines[5:] == ["q1 Q0 a 1 2.0 t1", "q1 Q0 b 2 2.0 t1", "q1 Q0 c 3 2.0 t1"]
    back = read_run(path)
    assert back == RUN
    assert list(back) == ["q2", "q1"]
    assert list(back["q2"]) == ["007", "D10", "D7", "D1", "x"]


def test_trec_file_parses_with_ir_measures_identically(tmp_path):
    path = tmp_path / "run.trec"
    write_run(RUN, path)
    theirs: dict[str, dict[str, float]] = {}
    for scored in ir_measures.read_trec_run(str(path)):
        theirs.setdefault(scored.query_id, {})[scored.doc_id] = scored.score
    assert theirs == RUN == read_run(path)


def test_float32_scores_round_trip_bit_exact(tmp_path):
    scores = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    run = {"q": {f"d{i}": float(s) for i, s in enumerate(scores)}}
    write_run(run, tmp_path / "r.trec")
    back = read_run(tmp_path / "r.trec")["q"]
    np.testing.assert_array_equal(np.array([back[f"d{i}"] for i in range(50)], dtype=np.float32), scores)


def test_msmarco_round_trip_keeps_rank_order(tmp_path):
    path = tmp_path / "run.tsv"
    write_run(RUN, path, format="msmarco")
    assert path.read_text().splitlines()[:3] == ["q2\t007\t1", "q2\tD10\t2", "q2\tD7\t3"]
    back = read_run(path)
    assert back == {
        "q2": {"007": -1.0, "D10": -2.0, "D7": -3.0, "D1": -4.0, "x": -5.0},
        "q1": {"a": -1.0, "b": -2.0, "c": -3.0},
    }
    # The order written is the order read back, so re-writing gives the same file.
    write_run(back, tmp_path / "again.tsv", format="msmarco")
    assert (tmp_path / "again.tsv").read_text() == path.read_text()


@pytest.mark.parametrize("fmt", ["trec", "msmarco"])
def test_k_truncation(tmp_path, fmt):
    path = tmp_path / "run"
    write_run(RUN, path, format=fmt, k=2)
    back = read_run(path)
    assert {q: list(h) for q, h in back.items()} == {"q2": ["007", "D10"], "q1": ["a", "b"]}


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("\n\nq1 Q0 d1 1 3.5 t\n\nq1 Q0 d2 2 1 t\n")
    assert read_run(path) == {"q1": {"d1": 3.5, "d2": 1.0}}


def test_failed_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "run.trec"
    write_run({"q": {"d": 1.0}}, path)
    before = path.read_text()
    # The first query is fine, the second is not: nothing of the new run may reach the file.
    with pytest.raises(InputError, match="not finite"):
        write_run({"q1": {"a": 1.0}, "q2": {"b": float("inf")}}, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 t\n", 2, "expected 6"),
        ("q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 abc t\n", 2, "'abc' is not a number"),
        ("q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 nan t\n", 2, "'nan' is not finite"),
        ("q1 Q0 d1 one 1.0 t\n", 1, "rank 'one' is not an integer"),
        (
            "q1 Q0 d1 1 1.0 t\n\nq1 Q0 d1 2 0.5 t\n",
            3,
            "duplicate hit: query 'q1', doc 'd1' (first on line 1)",
        ),
        ("q1\td1\t1\nq1\td2\tx\n", 2, "rank 'x' is not an integer"),
        ("q1\td1\t1\nq1\td2\t2\tjunk\n", 2, "expected 3 tab-separated"),
        ("q1\td1\t1\nq1 Q0 d2 2 1.0 t\n", 2, "expected 3 tab-separated"),
        ("q1\td1\t1\nq1\td1\t2\n", 2, "duplicate hit"),
        ("q1 d1 1\n", 1, "not a run file"),
    ],
)
def test_bad_run_lines(tmp_path, text, line, problem):
    path = tmp_path / "bad.run"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_run(path)
    assert err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert problem in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="run file not found") as err:
        read_run(tmp_path / "nope.trec")
    assert err.value.path == str(tmp_path / "nope.trec")
    (tmp_path / "empty.trec").write_text("\n  \n")
    with pytest.raises(InputError, match="empty run file") as err:
        read_run(tmp_path / "empty.trec")
    assert err.value.path == str(tmp_path / "empty.trec")


@pytest.mark.parametrize(
    ("run", "kwargs", "problem"),
    [
        ({"q 1": {"d": 1.0}}, {}, "query id 'q 1'"),
        ({"q": {"": 1.0}}, {}, "doc id ''"),
        ({"q": {"d": float("nan")}}, {}, "not finite"),
        ({"q": {"d": 1.0}}, {"format": "csv"}, "unknown run format 'csv'"),
        ({"q": {"d": 1.0}}, {"tag": "my tag"}, "run tag 'my tag'"),
        ({"q": {"d": 1.0}}, {"k": 0}, "k must be >= 1"),
    ],
)
def test_write_rejects_unwritable_runs(tmp_path, run, kwargs, problem):
    with pytest.raises(InputError) as err:
        write_run(run, tmp_path / "r", **kwargs)
    assert problem in str(err.value)
    assert not (tmp_path / "r").exists()


def test_run_from_search_skips_missing_results():
    doc_ids = np.array(["D0", "D1", "007", "D3"])
    scores = np.array([[3.0, 2.5, -np.inf], [1.0, 0.5, 0.25]], dtype=np.float32)
    indices = np.array([[2, 0, -1], [3, 1, 2]])
    run = run_from_search(["qa", "qb"], doc_ids, scores, indices)
    assert run == {"qa": {"007": 3.0, "D0": 2.5}, "qb": {"D3": 1.0, "D1": 0.5, "007": 0.25}}
    assert all(type(s) is float for hits in run.values() for s in hits.values())
    assert all(type(d) is str for hits in run.values() for d in hits)


def test_run_from_search_shape_errors():
    with pytest.raises(InputError, match="must both be"):
        run_from_search(["q"], ["d"], np.zeros((2, 1)), np.zeros((2, 1), dtype=int))
    with pytest.raises(InputError, match="out of range"):
        run_from_search(["q"], ["d"], np.zeros((1, 1)), np.array([[1]]))


def test_gzipped_and_undecodable_runs(tmp_path):
    run = {"q1": {"d1": 2.0, "d2": 1.0}, "q2": {"d3": 0.5}}
    plain = tmp_path / "run.trec"
    write_run(run, plain, format="trec")
    packed = tmp_path / "run.trec.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_run(packed) == read_run(plain) == run
    garbled = tmp_path / "bad.trec.gz"
    garbled.write_bytes(gzip.compress(plain.read_bytes())[:-12])  # cut short
    with pytest.raises(InputError, match="not a valid gzip file"):
        read_run(garbled)
    latin = tmp_path / "latin.trec"
    latin.write_bytes(plain.read_bytes() + "q3 Q0 d\xe9 1 0.1 t\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.trec:4: not valid UTF-8"):
        read_run(latin)
