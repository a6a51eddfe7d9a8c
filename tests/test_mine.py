"""Hard-negative mining: hand-made run + qrels -> expected groups; write_groups -> load_train_data."""

from __future__ import annotations

import json
import logging

import pytest

from dualenc.errors import InputError
from dualenc.io.qrels import read_qrels
from dualenc.io.runs import read_run
from dualenc.retrieval.mine import mine_hard_negatives, write_groups
from dualenc.training.batches import GroupDataset
from dualenc.training.data import load_train_data

# q1's ranking by score, ties broken by doc id: d1, d2, d3 (d2 < d3 at 0.8), d4, d5, d6, d7
RUN = """\
q1 Q0 d3 3 0.8 bm25
q1 Q0 d1 1 0.9 bm25
q1 Q0 d2 2 0.8 bm25
q1 Q0 d4 4 0.7 bm25
q1 Q0 d5 5 0.6 bm25
q1 Q0 d6 6 0.5 bm25
q1 Q0 d7 7 0.4 bm25
q2 Q0 d2 1 2.0 bm25
q2 Q0 d1 2 1.0 bm25
q3 Q0 d1 1 1.0 bm25
q4 Q0 d1 1 1.0 bm25
"""
# q1: d2 relevant (1), d5 judged non-relevant (0), d4 highly relevant (2), d9 relevant but not retrieved;
# q2 all top docs are positives; q3 judged non-relevant only; q5 is not in the run; q4 is not in the qrels
QRELS = """\
q1 0 d2 1
q1 0 d5 0
q1 0 d4 2
q1 0 d9 1
q2 0 d2 1
q2 0 d1 1
q3 0 d1 0
q5 0 d1 1
"""
CORPUS = "".join(f"d{i}\tpassage {i}\n" for i in range(1, 10))
QUERIES = "q1\tfirst query\nq2\tsecond query\nq3\tthird query\nq4\tfourth\nq5\tfifth\n"


@pytest.fixture
def run_qrels(tmp_path):
    (tmp_path / "run.trec").write_text(RUN, encoding="utf-8")
    (tmp_path / "qrels.txt").write_text(QRELS, encoding="utf-8")
    return read_run(tmp_path / "run.trec"), read_qrels(tmp_path / "qrels.txt")


def test_defaults_drop_positives_and_keep_judged_non_relevant(run_qrels, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.retrieval.mine")
    run, qrels = run_qrels
    assert list(mine_hard_negatives(run, qrels)) == [
        {
            "query_id": "q1",
            "positive_ids": ["d2", "d4", "d9"],
            "negative_ids": ["d1", "d3", "d5", "d6", "d7"],
        },
        {"query_id": "q2", "positive_ids": ["d2", "d1"], "negative_ids": []},
    ]
    assert "mined 2 query groups (1 with no negative left)" in caplog.text
    assert "skipped 1 qrels queries absent from the run and 1 with no judgment >= 1" in caplog.text


@pytest.mark.parametrize(
    "kwargs, negatives",
    [
        ({"depth": 5}, ["d1", "d3", "d5"]),  # top 5 = d1 d2 d3 d4 d5, minus positives d2 d4
        ({"depth": 5, "skip_top": 1}, ["d3", "d5"]),  # d1 skipped
        ({"depth": 5, "skip_top": 3}, ["d5"]),  # d1 d2 d3 skipped
        ({"num_negatives": 2}, ["d1", "d3"]),
        ({"skip_top": 2, "num_negatives": 0}, []),
        ({"depth": 1}, ["d1"]),
    ],
)
def test_depth_skip_top_num_negatives(run_qrels, kwargs, negatives):
    run, qrels = run_qrels
    assert next(iter(mine_hard_negatives(run, qrels, **kwargs)))["negative_ids"] == negatives


def test_min_relevance_two_makes_grade_one_docs_negatives(run_qrels):
    run, qrels = run_qrels
    groups = list(mine_hard_negatives(run, qrels, min_relevance=2, depth=4))
    assert groups == [{"query_id": "q1", "positive_ids": ["d4"], "negative_ids": ["d1", "d2", "d3"]}]


def test_queries_add_the_text(run_qrels):
    run, qrels = run_qrels
    texts = {"q1": "first query", "q2": "second query"}
    assert [g["query"] for g in mine_hard_negatives(run, qrels, queries=texts)] == list(texts.values())
    with pytest.raises(InputError, match="query id 'q2'"):
        list(mine_hard_negatives(run, qrels, queries={"q1": "first query"}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 0}, "depth must be >= 1"),
        ({"depth": 3, "skip_top": 3}, r"skip_top must be in \[0, depth=3\)"),
        ({"skip_top": -1}, "skip_top must be in"),
        ({"num_negatives": -1}, "num_negatives must be >= 0"),
    ],
)
def test_bad_arguments_fail_at_the_call(kwargs, message):
    with pytest.raises(InputError, match=message):
        mine_hard_negatives({}, {}, **kwargs)  # not iterated: the check is eager


def test_write_groups_is_plain_jsonl_and_replaces_the_file(tmp_path, run_qrels):
    run, qrels = run_qrels
    path = tmp_path / "out" / "groups.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n", encoding="utf-8")
    groups = list(mine_hard_negatives(run, qrels, queries={"q1": "première", "q2": "b"}))
    assert write_groups(iter(groups), path) == 2
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == groups
    assert "première" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert sorted(p.name for p in path.parent.iterdir()) == ["groups.jsonl"]  # no temporary file left


def test_round_trip_through_load_train_data(tmp_path, run_qrels, caplog):
    caplog.set_level(logging.INFO, logger="dualenc.training")
    run, qrels = run_qrels
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text(CORPUS, encoding="utf-8")
    queries = tmp_path / "queries.tsv"
    queries.write_text(QUERIES, encoding="utf-8")
    groups = list(mine_hard_negatives(run, qrels, depth=6))
    write_groups(groups, tmp_path / "mined.jsonl")
    data = load_train_data(
        tmp_path / "mined.jsonl", corpus_file=corpus, queries_file=queries, cache_dir=str(tmp_path / "hf")
    )
    assert "train data format: groups" in caplog.text
    ids = list(data.corpus["id"])
    loaded = [
        {
            "query_id": g["query_id"],
            "positive_ids": [ids[r] for r in g["positives"]],
            "negative_ids": [ids[r] for r in g["negatives"]],
        }
        for g in data.groups
    ]
    assert loaded == groups
    assert list(data.groups["query"]) == ["first query", "second query"]
    assert data.groups[0]["negatives"] == [0, 2, 4, 5]  # d1 d3 d5 d6 -> rows of corpus.tsv
    with pytest.raises(
        InputError, match="query id 'q2' .* has no negatives"
    ):  # all of q2's top hits are positives
        GroupDataset(data, 3)
    dataset = GroupDataset(data, 1)
    assert [dataset[i]["positives"] for i in range(2)] == [[1, 3, 8], [1, 0]]  # d2 d4 d9; d2 d1


def _mine_cli(tmp_path, *extra: str) -> int:
    from dualenc.cli.main import main

    (tmp_path / "run.trec").write_text(RUN, encoding="utf-8")
    (tmp_path / "qrels.txt").write_text(QRELS, encoding="utf-8")
    (tmp_path / "corpus.tsv").write_text(CORPUS, encoding="utf-8")
    (tmp_path / "queries.tsv").write_text(QUERIES, encoding="utf-8")
    base = [
        "mine",
        "--run",
        str(tmp_path / "run.trec"),
        "--qrels",
        str(tmp_path / "qrels.txt"),
        "--depth",
        "6",
    ]
    return main([*base, *extra])


def test_mine_writes_tevatron_text_jsonl_that_trains_like_the_groups(tmp_path, caplog):
    """--format tevatron: the texts of the same groups; load_train_data reads both files into the same
    training examples (query text, positive and negative passage texts)."""
    from dualenc.io.readers import doc_texts

    common = ["--topics", str(tmp_path / "queries.tsv")]
    assert _mine_cli(tmp_path, *common, "--output", str(tmp_path / "groups.jsonl")) == 0
    tevatron = ["--collection", str(tmp_path / "corpus.tsv"), "--format", "tevatron"]
    assert _mine_cli(tmp_path, *common, *tevatron, "--output", str(tmp_path / "tev.jsonl")) == 0
    rows = [json.loads(line) for line in (tmp_path / "tev.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {
        "query_id": "q1",
        "query": "first query",
        "positive_passages": [
            {"docid": d, "title": "", "text": f"passage {d[1:]}"} for d in ("d2", "d4", "d9")
        ],
        "negative_passages": [
            {"docid": d, "title": "", "text": f"passage {d[1:]}"} for d in ("d1", "d3", "d5", "d6")
        ],
    }

    def examples(data) -> list[tuple]:
        texts = doc_texts(data.corpus)
        return [
            (g["query"], sorted(texts[r] for r in g["positives"]), sorted(texts[r] for r in g["negatives"]))
            for g in data.groups
        ]

    groups = load_train_data(
        tmp_path / "groups.jsonl",
        corpus_file=tmp_path / "corpus.tsv",
        queries_file=tmp_path / "queries.tsv",
        cache_dir=str(tmp_path / "hf"),
    )
    tev = load_train_data(tmp_path / "tev.jsonl", cache_dir=str(tmp_path / "hf2"))
    assert examples(tev) == examples(groups) and len(examples(tev)) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "tevatron", "--collection", "COLL"], "give --topics and --collection"),
        (["--format", "tevatron", "--topics", "TOPICS"], "give --topics and --collection"),
    ],
)
def test_mine_tevatron_needs_texts_and_writes_nothing_without_them(tmp_path, capsys, extra, message):
    extra = [
        x.replace("COLL", str(tmp_path / "corpus.tsv")).replace("TOPICS", str(tmp_path / "queries.tsv"))
        for x in extra
    ]
    assert _mine_cli(tmp_path, *extra, "--output", str(tmp_path / "out.jsonl")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_mine_tevatron_refuses_a_document_missing_from_the_collection(tmp_path, capsys):
    (tmp_path / "small.tsv").write_text("".join(f"d{i}\tpassage {i}\n" for i in range(1, 5)))
    code = _mine_cli(
        tmp_path,
        "--topics",
        str(tmp_path / "queries.tsv"),
        "--collection",
        str(tmp_path / "small.tsv"),
        "--format",
        "tevatron",
        "--output",
        str(tmp_path / "out.jsonl"),
    )
    err = capsys.readouterr().err
    assert code == 2 and "document id 'd9' of the run or qrels is not in the collection" in err  # q1's first
    assert not (tmp_path / "out.jsonl").exists()


def test_hard_negative_round_recipe_end_to_end(tmp_path, tiny_model_dir):
    """recipes/hard_negative_round.sh: encode -> retrieve -> mine -> train. Oracle: the tiny model's own exact
    ranking (brute-force inner products), top DEPTH, the first SKIP_TOP dropped, positives dropped, first NUM
    kept; the run trains on groups of 1 + NUM; a rerun does nothing."""
    import os
    import subprocess

    import numpy as np
    from helpers import REPO, make_text

    from dualenc.model.encoder import DualEncoder
    from dualenc.retrieval.encode import encode_texts

    rng = np.random.default_rng(3)
    docs = {f"d{i}": make_text(rng, 4, 12) for i in range(40)}
    queries = {f"q{i}": make_text(rng, 2, 5) for i in range(12)}
    qrels = {q: {f"d{3 * i}": 1, f"d{3 * i + 1}": 1 if i % 2 else 0} for i, q in enumerate(queries)}
    (tmp_path / "corpus.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()))
    (tmp_path / "qrels.txt").write_text(
        "".join(f"{q} 0 {d} {g}\n" for q, judged in qrels.items() for d, g in judged.items())
    )
    out = tmp_path / "round"
    env = {
        **os.environ,
        "MODEL": str(tiny_model_dir),
        "CORPUS": str(tmp_path / "corpus.tsv"),
        "TOPICS": str(tmp_path / "topics.tsv"),
        "QRELS": str(tmp_path / "qrels.txt"),
        "OUT": str(out),
        "DEPTH": "10",
        "SKIP_TOP": "2",
        "NUM_NEGATIVES": "2",
        "CONFIG": str(REPO / "recipes" / "configs" / "tiny.yaml"),
    }
    over = [
        f"model_name_or_path={tiny_model_dir}",
        "random_init=false",
        "corpus_file=" + str(tmp_path / "corpus.tsv"),
        "max_steps=2",
        "per_device_train_batch_size=4",
        f"datasets_cache_dir={tmp_path / 'hf'}",
    ]
    script = str(REPO / "recipes" / "hard_negative_round.sh")
    proc = subprocess.run(["bash", script, *over], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    model = DualEncoder.from_pretrained(tiny_model_dir)
    doc_ids = list(docs)
    d_emb = encode_texts(model, list(docs.values()), kind="doc", batch_size=8)  # (40, D)
    q_emb = encode_texts(model, list(queries.values()), kind="query", batch_size=8)  # (12, D)
    scores = q_emb.astype(np.float64) @ d_emb.astype(np.float64).T  # (12, 40)
    groups = [json.loads(line) for line in (out / "train_groups.jsonl").read_text().splitlines()]
    assert [g["query_id"] for g in groups] == list(queries)
    for g, (qid, row) in zip(groups, zip(queries, scores, strict=True), strict=True):
        ranked = [doc_ids[i] for i in np.argsort(-row, kind="stable")][:10][2:]
        positives = [d for d, grade in qrels[qid].items() if grade >= 1]
        assert g["positive_ids"] == positives
        assert g["negative_ids"] == [d for d in ranked if d not in positives][:2]
    config = (out / "run" / "config.yaml").read_text()
    assert "train_group_size: 3" in config and "train_format: groups" in config
    assert json.loads((out / "run" / "train_summary.json").read_text())["steps"] == 2

    cost = [line.split("\t") for line in (out / "mining_cpu.tsv").read_text().splitlines()]
    assert [step for step, _ in cost] == ["encode", "retrieve", "mine"]
    # each step is a python process that imports torch: well over 0.1 CPU seconds, and not a whole minute
    assert all(0.1 < float(cpu_s) < 60 for _, cpu_s in cost), cost

    stamp = (out / "train_groups.jsonl").stat().st_mtime_ns
    again = subprocess.run(["bash", script, *over], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (out / "train_groups.jsonl").stat().st_mtime_ns == stamp
    assert len((out / "mining_cpu.tsv").read_text().splitlines()) == 3, "a skipped step adds no cost"
