"""dualenc.evaluation.measures: hand-computed values, pytrec_eval as a second oracle, real DL19 figures,
input errors."""

from __future__ import annotations

import math

import ir_measures
import pytest
import pytrec_eval

from dualenc.errors import InputError
from dualenc.evaluation.measures import (
    PRESETS,
    check_run_queries,
    evaluate,
    evaluate_per_query,
    parse_measures,
)
from dualenc.io.text_table import format_table

# Graded labels 0-3. q1 ranks: d2(0) d3(1) d9(unjudged) d1(3) d5(unjudged) d4(2).
# q2 ranks: d6(1) d8(unjudged) d7(2). q3: ten unjudged passages, then its only relevant one at rank 11.
QRELS_TREC = """\
q1 0 d1 3
q1 0 d2 0
q1 0 d3 1
q1 0 d4 2
q2 0 d6 1
q2 0 d7 2
q3 0 d10 1
"""

RUN_TREC = """\
q1 Q0 d2 1 4.0 t
q1 Q0 d3 2 3.0 t
q1 Q0 d9 3 2.5 t
q1 Q0 d1 4 2.0 t
q1 Q0 d5 5 1.0 t
q1 Q0 d4 6 0.5 t
q2 Q0 d6 1 5.0 t
q2 Q0 d8 2 4.0 t
q2 Q0 d7 3 3.0 t
q3 Q0 n1 1 20.0 t
q3 Q0 n2 2 19.0 t
q3 Q0 n3 3 18.0 t
q3 Q0 n4 4 17.0 t
q3 Q0 n5 5 16.0 t
q3 Q0 n6 6 15.0 t
q3 Q0 n7 7 14.0 t
q3 Q0 n8 8 13.0 t
q3 Q0 n9 9 12.0 t
q3 Q0 n10 10 11.0 t
q3 Q0 d10 11 10.0 t
"""


def qrels_dict(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for qrel in ir_measures.read_trec_qrels(text):
        out.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
    return out


def run_dict(text: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for doc in ir_measures.read_trec_run(text):
        out.setdefault(doc.query_id, {})[doc.doc_id] = doc.score
    return out


QRELS = qrels_dict(QRELS_TREC)
RUN = run_dict(RUN_TREC)


def dcg(gains: list[float]) -> float:
    """trec_eval's DCG: gain = label, discount log2(rank + 1), rank from 1."""
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


# Written out per query: (q1, q2, q3); the mean divides by the 3 qrels queries.
NDCG10 = (
    dcg([0, 1, 0, 3, 0, 2]) / dcg([3, 2, 1]),
    dcg([1, 0, 2]) / dcg([2, 1]),
    0.0,  # the relevant passage sits at rank 11
)
HAND = {
    "RR@10": (1 / 2 + 1 / 1 + 0) / 3,  # first rel>=1: rank 2, rank 1, beyond 10
    "RR": (1 / 2 + 1 / 1 + 1 / 11) / 3,  # no cut-off: q3 counts its rank-11 hit
    "RR(rel=2)@10": (1 / 4 + 1 / 3 + 0) / 3,  # first rel>=2: d1 at 4, d7 at 3
    "nDCG@10": sum(NDCG10) / 3,
    "R@5": (2 / 3 + 2 / 2 + 0 / 1) / 3,  # q1: d3, d1 of {d1, d3, d4} in the top 5
    "R@10": (3 / 3 + 2 / 2 + 0 / 1) / 3,
    "R(rel=2)@5": (1 / 2 + 1 / 1 + 0) / 3,  # q1: d1 of {d1, d4}; q3 has no rel>=2 document
}

# The same values straight from pytrec_eval: (trec_eval measure, result key, relevance_level, top-k cut
# applied to the run first, since trec_eval's recip_rank has no cut-off).
PYTREC = {
    "RR@10": ("recip_rank", "recip_rank", 1, 10),
    "RR": ("recip_rank", "recip_rank", 1, None),
    "RR(rel=2)@10": ("recip_rank", "recip_rank", 2, 10),
    "nDCG@10": ("ndcg_cut.10", "ndcg_cut_10", 1, None),
    "R@5": ("recall.5", "recall_5", 1, None),
    "R@10": ("recall.10", "recall_10", 1, None),
    "R(rel=2)@5": ("recall.5", "recall_5", 2, None),
}


def pytrec_mean(qrels, run, name: str) -> float:
    measure, key, rel, top = PYTREC[name]
    if top is not None:
        run = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:top]) for q, docs in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {measure}, relevance_level=rel).evaluate(run)
    return sum(per_query.get(q, {}).get(key, 0.0) for q in qrels) / len(qrels)


@pytest.mark.parametrize("name", list(HAND))
def test_hand_computed_and_pytrec_eval(name):
    got = evaluate(QRELS, RUN, name)
    assert list(got) == [name]
    assert got[name] == pytest.approx(HAND[name], abs=1e-9)
    assert got[name] == pytest.approx(pytrec_mean(QRELS, RUN, name), abs=1e-9)


def test_hand_values_are_not_degenerate():
    # guards the oracle itself: distinct cut-offs and relevance levels must give different numbers
    assert HAND["RR@10"] != HAND["RR"] and HAND["RR@10"] != HAND["RR(rel=2)@10"]
    assert HAND["R@5"] != HAND["R@10"] and 0 < HAND["nDCG@10"] < 1


def test_per_query_values():
    got = evaluate_per_query(QRELS, RUN, ["nDCG@10", "RR(rel=2)@10"])
    assert list(got) == ["q1", "q2", "q3"]
    assert list(got["q1"]) == ["nDCG@10", "RR(rel=2)@10"]
    for qid, expected in zip(["q1", "q2", "q3"], NDCG10, strict=True):
        assert got[qid]["nDCG@10"] == pytest.approx(expected, abs=1e-9)
    assert [got[q]["RR(rel=2)@10"] for q in got] == pytest.approx([1 / 4, 1 / 3, 0.0])


def test_preset_keys_are_ir_measures_strings():
    got = evaluate(QRELS, RUN, "trec-dl")
    assert list(got) == ["nDCG@10", "RR(rel=2)@10", "R(rel=2)@1000"]
    assert got["nDCG@10"] == pytest.approx(HAND["nDCG@10"])
    assert got["R(rel=2)@1000"] == pytest.approx((2 / 2 + 1 / 1 + 0) / 3)


MEASURES = ["RR@10", "nDCG@10", "R@5", "RR(rel=2)@10"]


def test_missing_query_counts_as_zero():
    run = {q: docs for q, docs in RUN.items() if q != "q2"}
    qrels_present = {q: docs for q, docs in QRELS.items() if q != "q2"}
    over_two = evaluate(qrels_present, run, MEASURES)
    over_three = evaluate(QRELS, run, MEASURES)
    assert all(value > 0 for value in over_two.values())
    assert over_three == pytest.approx({m: v * 2 / 3 for m, v in over_two.items()})
    assert evaluate(QRELS, run, MEASURES, missing_as_zero=False) == pytest.approx(over_two)

    per_query = evaluate_per_query(QRELS, run, MEASURES)
    assert list(per_query) == ["q1", "q2", "q3"]
    assert per_query["q2"] == {m: 0.0 for m in MEASURES}
    assert list(evaluate_per_query(QRELS, run, MEASURES, missing_as_zero=False)) == ["q1", "q3"]


def test_query_without_relevant_documents_is_treated_alike_present_or_missing():
    qrels = {**QRELS, "q4": {"d20": 0, "d21": 0}}  # judged, none relevant
    run_with = {**RUN, "q4": {"d20": 2.0, "d22": 1.0}}
    with_q4 = evaluate(qrels, run_with, MEASURES)
    assert evaluate(qrels, RUN, MEASURES) == pytest.approx(with_q4)
    # ranked or not, q4 is one more zero in the mean: 3/4 of the three-query values
    assert with_q4 == pytest.approx({m: v * 3 / 4 for m, v in evaluate(QRELS, RUN, MEASURES).items()})
    assert evaluate_per_query(qrels, run_with, MEASURES)["q4"] == {m: 0.0 for m in MEASURES}
    assert evaluate_per_query(qrels, RUN, MEASURES)["q4"] == {m: 0.0 for m in MEASURES}
    # missing_as_zero=False keeps it when ranked (as ir-measures does), drops it when not
    assert evaluate(qrels, run_with, MEASURES, missing_as_zero=False) == pytest.approx(with_q4)
    assert evaluate(qrels, RUN, MEASURES, missing_as_zero=False) == pytest.approx(
        evaluate(QRELS, RUN, MEASURES)
    )


def test_unknown_run_queries_are_ignored_by_evaluate():
    assert evaluate(QRELS, {**RUN, "zz": {"d1": 1.0}}, MEASURES) == pytest.approx(
        evaluate(QRELS, RUN, MEASURES)
    )


def test_evaluate_rejects_empty_inputs():
    with pytest.raises(InputError, match="qrels are empty"):
        evaluate({}, RUN, MEASURES)
    with pytest.raises(InputError, match="ranks none"):
        evaluate(QRELS, {"zz": {"d1": 1.0}}, MEASURES, missing_as_zero=False)


def test_bm25_dl19_matches_published_figures(shared_data):
    root = shared_data / "msmarco-passage"
    qrels_path, run_path = (
        root / "qrels.dl19-passage.txt",
        root / "runs" / "rank_llm.BM25.trec_results_dl19.txt",
    )
    qrels = qrels_dict(str(qrels_path))
    run = run_dict(str(run_path))
    check_run_queries(run, qrels, run_path=run_path, qrels_path=qrels_path)
    got = evaluate(qrels, run, "nDCG@10 RR(rel=2)@10 R(rel=2)@100 AP(rel=2)@100")
    assert {m: round(v, 4) for m, v in got.items()} == {
        "nDCG@10": 0.5058,
        "RR(rel=2)@10": 0.7024,
        "R(rel=2)@100": 0.4910,
        "AP(rel=2)@100": 0.2476,
    }


# --- check_run_queries -------------------------------------------------------------------------------

RUN_WITH_UNKNOWN = """\
q1 Q0 d1 1 2.0 t
q1 Q0 d2 2 1.0 t
q2 Q0 d6 1 1.0 t
zz9 Q0 d1 1 1.0 t
zz9 Q0 d2 2 0.5 t
aa1 Q0 d1 1 1.0 t
"""


def test_unknown_query_names_run_file_id_line_and_qrels(tmp_path):
    run_path, qrels_path = tmp_path / "dev.trec", tmp_path / "qrels.txt"
    run_path.write_text(RUN_WITH_UNKNOWN)
    # dict order differs from file order on purpose: the error must report the file's first unknown id
    run = dict(sorted(run_dict(RUN_WITH_UNKNOWN).items()))
    with pytest.raises(InputError) as info:
        check_run_queries(run, QRELS, run_path=run_path, qrels_path=qrels_path, strict=True)
    err = info.value
    assert (err.path, err.line) == (str(run_path), 4)
    assert str(err).startswith(f"{run_path}:4: query id 'zz9' is not in the qrels {qrels_path}")
    assert "2 of 4 run queries" in str(err)


def test_unknown_query_line_in_msmarco_tsv_run(tmp_path):
    run_path = tmp_path / "dev.tsv"
    run_path.write_text("q1\td1\t1\nq1\td2\t2\nbad\td1\t1\n")
    run = {"q1": {"d1": 2.0, "d2": 1.0}, "bad": {"d1": 1.0}}
    with pytest.raises(InputError, match=r"dev\.tsv:3: query id 'bad'") as info:
        check_run_queries(run, QRELS, run_path=run_path, strict=True)
    assert info.value.line == 3


def test_unknown_query_without_run_path():
    with pytest.raises(InputError, match="query id 'zz9' is not in the qrels") as info:
        check_run_queries(run_dict(RUN_WITH_UNKNOWN), QRELS, strict=True)
    assert info.value.line is None and info.value.path is None


def test_unjudged_and_missing_queries_warn_with_counts(tmp_path, caplog):
    run_path, qrels_path = tmp_path / "dev.trec", tmp_path / "qrels.txt"
    run_path.write_text(RUN_WITH_UNKNOWN)
    # run: q1 q2 (judged), zz9 aa1 (unjudged); qrels: q1 q2 q3, so q3 counts 0
    with caplog.at_level("WARNING", logger="dualenc.evaluation.measures"):
        warnings = check_run_queries(
            run_dict(RUN_WITH_UNKNOWN), QRELS, run_path=run_path, qrels_path=qrels_path
        )
    assert warnings == [
        f"2 run queries have no judgments in the qrels {qrels_path} and are ignored (first: 'zz9' on line 4)",
        "the run ranks 2 of 3 judged queries; the other 1 count 0",
    ]
    assert [r.getMessage() for r in caplog.records] == warnings
    # averaging over the run's queries only: nothing counts 0, so no second warning
    assert len(check_run_queries(run_dict(RUN_WITH_UNKNOWN), QRELS, missing_as_zero=False)) == 1
    assert check_run_queries(RUN, QRELS) == []  # the same queries: nothing to say
    assert check_run_queries({"q1": RUN["q1"]}, QRELS) == [
        "the run ranks 1 of 3 judged queries; the other 2 count 0"
    ]


def test_unjudged_queries_are_ignored_as_trec_eval_does():
    run = {**RUN, "zz9": {"d1": 1.0, "d2": 0.5}}
    assert evaluate(QRELS, run, "nDCG@10 RR@10") == evaluate(QRELS, RUN, "nDCG@10 RR@10")


@pytest.mark.parametrize("strict", [False, True])
def test_disjoint_topics_are_rejected(tmp_path, strict):
    run_path, qrels_path = tmp_path / "run.trec", tmp_path / "qrels.dl20.txt"
    with pytest.raises(InputError, match="wrong topics/qrels pair") as info:
        check_run_queries(
            {"x1": {"d": 1.0}, "x2": {"d": 1.0}},
            QRELS,
            run_path=run_path,
            qrels_path=qrels_path,
            strict=strict,
        )
    message = str(info.value)
    assert message.startswith(f"{run_path}: ") and str(qrels_path) in message and "'x1'" in message


def test_empty_run_is_rejected(tmp_path):
    with pytest.raises(InputError, match="run ranks no query"):
        check_run_queries({}, QRELS, run_path=tmp_path / "run.trec")


# --- parse_measures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets(name):
    assert [str(m) for m in parse_measures(name)] == PRESETS[name]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("nDCG@10 RR(rel=2)@10", ["nDCG@10", "RR(rel=2)@10"]),
        (" nDCG@10 ,  RR(rel=2)@10 ", ["nDCG@10", "RR(rel=2)@10"]),
        (["nDCG@10", "R@100"], ["nDCG@10", "R@100"]),
        ("RR(rel=2, judged_only=False)@10,AP(rel=2)@100", ["RR(rel=2)@10", "AP(rel=2)@100"]),
        ("msmarco-dev nDCG@10 RR@10", ["RR@10", "R@1000", "nDCG@10"]),  # preset expanded, duplicate dropped
        ("MRR@10", ["RR@10"]),  # ir-measures alias, canonical key
    ],
)
def test_measure_lists(spec, expected):
    assert [str(m) for m in parse_measures(spec)] == expected


@pytest.mark.parametrize(
    "spec, token", [("nDCG@10 Foo@3", "Foo@3"), ("RR@ten", "RR@ten"), ("nDCG(x=1)@10", "x=1")]
)
def test_bad_measure_names_the_token(spec, token):
    with pytest.raises(InputError, match=rf"bad measure '.*{token}") as info:
        parse_measures(spec)
    assert "preset" in str(info.value)


def test_empty_measure_spec():
    with pytest.raises(InputError, match="no measures"):
        parse_measures(" , ")


# --- format_table --------------------------------------------------------------------------------------


def test_format_table_exact():
    rows = [
        {"run": "bm25", "nDCG@10": 0.50584, "R@100": 0.491, "queries": 43},
        {"run": "dense", "nDCG@10": 0.7, "queries": 43},
    ]
    assert format_table(rows) == (
        "run    nDCG@10   R@100  queries\n"
        "-----  -------  ------  -------\n"
        "bm25    0.5058  0.4910       43\n"
        "dense   0.7000       -       43"
    )
    assert format_table(rows, columns=["nDCG@10", "run"]) == (
        "nDCG@10  run\n-------  -----\n 0.5058  bm25\n 0.7000  dense"
    )
    assert format_table([]) == ""
