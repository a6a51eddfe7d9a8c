"""The `dualenc` command line end to end on a tiny model: encode -> index -> search/retrieve -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import load_script, make_text, write_collection

from dualenc.cli import main
from dualenc.io.embeddings import load_embeddings
from dualenc.io.runs import read_run
from dualenc.model.encoder import DualEncoder


@pytest.fixture
def corpus(tmp_path):
    ids = write_collection(tmp_path / "collection.tsv", 120, seed=1)
    rng = np.random.default_rng(2)
    qids = [f"q{i}" for i in range(6)]
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\t{make_text(rng, 2, 6)}\n" for q in qids))
    qrels = [f"{q} 0 {ids[(7 * i) % len(ids)]} {1 + i % 3}" for i, q in enumerate(qids)]
    (tmp_path / "qrels.txt").write_text("\n".join(qrels) + "\n")
    return tmp_path


def _brute_force_run(model_dir, corpus, k):
    """Oracle: encode with the model directly and rank all documents by the inner product."""
    model = DualEncoder.from_pretrained(model_dir).eval()
    docs = [line.split("\t") for line in (corpus / "collection.tsv").read_text().splitlines()]
    topics = [line.split("\t") for line in (corpus / "topics.tsv").read_text().splitlines()]
    d = model.encode_docs(model.tokenize_docs([t for _, t in docs])).detach().numpy()
    q = model.encode_queries(model.tokenize_queries([t for _, t in topics])).detach().numpy()
    scores = q @ d.T
    run = {}
    for row, (qid, _) in enumerate(topics):
        top = np.argsort(-scores[row], kind="stable")[:k]
        run[qid] = [docs[j][0] for j in top]
    return run


def test_pipeline_commands(tiny_model_dir, corpus, capsys):
    c = corpus
    assert (
        main(
            [
                "-q",
                "encode",
                "--model",
                str(tiny_model_dir),
                "--collection",
                str(c / "collection.tsv"),
                "--output",
                str(c / "emb"),
                "--batch-size",
                "16",
                "--chunk-size",
                "50",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert sum(len(s.ids) for s in load_embeddings(c / "emb")) == 120
    for factory, out in (("Flat", "flat"), ("HNSW32", "hnsw")):
        assert (
            main(
                [
                    "-q",
                    "index",
                    "--embeddings",
                    str(c / "emb"),
                    "--output",
                    str(c / out),
                    "--factory",
                    factory,
                ]
            )
            == 0
        )
    oracle = _brute_force_run(tiny_model_dir, c, 10)
    for index in ("flat", "emb"):  # faiss Flat index, and exact torch search straight from the embeddings
        run_path = c / f"run.{index}.trec"
        assert (
            main(
                [
                    "-q",
                    "retrieve",
                    "--encoder",
                    str(tiny_model_dir),
                    "--topics",
                    str(c / "topics.tsv"),
                    "--index",
                    str(c / index),
                    "--hits",
                    "10",
                    "--output",
                    str(run_path),
                ]
            )
            == 0
        )
        run = read_run(run_path)
        assert {q: [d for d, _ in sorted(h.items(), key=lambda x: -x[1])] for q, h in run.items()} == oracle
    # search from pre-encoded queries gives the same run as retrieve
    assert (
        main(
            [
                "-q",
                "encode",
                "--model",
                str(tiny_model_dir),
                "--topics",
                str(c / "topics.tsv"),
                "--output",
                str(c / "qemb"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "search",
                "--queries",
                str(c / "qemb"),
                "--index",
                str(c / "flat"),
                "--hits",
                "10",
                "--output",
                str(c / "run.search.tsv"),
                "--output-format",
                "msmarco",
            ]
        )
        == 0
    )
    lines = (c / "run.search.tsv").read_text().splitlines()
    assert lines[0].count("\t") == 2 and lines[0].endswith("\t1")
    assert {q: list(h) for q, h in read_run(c / "run.search.tsv").items()} == oracle
    # HNSW over 120 points with efSearch 64 is exact here
    assert (
        main(
            [
                "-q",
                "retrieve",
                "--encoder",
                str(tiny_model_dir),
                "--topics",
                str(c / "topics.tsv"),
                "--index",
                str(c / "hnsw"),
                "--hits",
                "10",
                "--output",
                str(c / "run.hnsw.trec"),
                "--search-params",
                "efSearch=64",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--qrels",
                str(c / "qrels.txt"),
                "--run",
                str(c / "run.flat.trec"),
                "--measures",
                "nDCG@10 RR@10",
                "--json",
            ]
        )
        == 0
    )
    values = json.loads(capsys.readouterr().out)
    assert set(values) == {"nDCG@10", "RR@10"}
    # RR@10 by hand from the oracle ranking
    qrels = dict(line.split(" ", 1) for line in (c / "qrels.txt").read_text().splitlines())
    rr = [
        next((1 / (r + 1) for r, d in enumerate(oracle[q]) if d == rel.split()[1]), 0.0)
        for q, rel in qrels.items()
    ]
    assert values["RR@10"] == pytest.approx(np.mean(rr), abs=1e-9)


def test_evaluate_bm25_dl19(shared_data, capsys):
    ms = shared_data / "msmarco-passage"
    assert (
        main(
            [
                "evaluate",
                "--qrels",
                str(ms / "qrels.dl19-passage.txt"),
                "--run",
                str(ms / "runs" / "rank_llm.BM25.trec_results_dl19.txt"),
                "--measures",
                "nDCG@10 R(rel=2)@100",
                "--json",
            ]
        )
        == 0
    )
    values = json.loads(capsys.readouterr().out)
    assert round(values["nDCG@10"], 4) == 0.5058
    assert round(values["R(rel=2)@100"], 4) == 0.4910


def test_evaluate_table_and_per_query(corpus, capsys):
    run = corpus / "run.trec"
    run.write_text("q0 Q0 d0000 1 2.0 t\nq0 Q0 d0007 2 1.0 t\nq1 Q0 d0007 1 1.0 t\n")
    assert (
        main(
            [
                "evaluate",
                "--qrels",
                str(corpus / "qrels.txt"),
                "--run",
                str(run),
                "--measures",
                "RR@10",
                "--per-query",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["qid", "RR@10"]
    rows = {line.split()[0]: float(line.split()[1]) for line in out[2:]}
    # q0 relevant doc d0000 at rank 1; q1 relevant d0007 at rank 1; q2..q5 are missing from the run -> 0
    assert rows["q0"] == 1.0 and rows["q1"] == 1.0 and rows["all"] == pytest.approx(2 / 6, abs=1e-4)


@pytest.mark.parametrize(
    "argv_tail, content, expected",
    [
        (
            ["evaluate", "--qrels", "{d}/qrels.txt", "--run", "{d}/missing.trec"],
            None,
            "missing.trec: run file not found",
        ),
        (
            ["evaluate", "--qrels", "{d}/qrels.txt", "--run", "{d}/bad.trec"],
            "q0 Q0 d1 1 oops t\n",
            "bad.trec:1:",
        ),
        (
            ["evaluate", "--qrels", "{d}/qrels.txt", "--run", "{d}/bad.trec", "--measures", "nDCG@ten"],
            "q0 Q0 d1 1 1.0 t\n",
            "nDCG@ten",
        ),
        (["evaluate", "--qrels", "{d}/qrels.txt", "--run", "{d}/bad.trec"], "qX Q0 d1 1 1.0 t\n", "'qX'"),
        (
            [
                "encode",
                "--model",
                "{m}",
                "--collection",
                "{d}/bad.tsv",
                "--output",
                "{d}/e",
                "--device",
                "cpu",
            ],
            "a\tfirst\nb\t \n",
            "bad.tsv:2:",
        ),
        (
            [
                "encode",
                "--model",
                "{m}",
                "--collection",
                "{d}/bad.tsv",
                "--output",
                "{d}/e",
                "--device",
                "cpu",
            ],
            "a\tfirst\na\tagain\n",
            "bad.tsv:2:",
        ),
        (["index", "--embeddings", "{d}", "--output", "{d}/i"], None, "meta.json"),
        (
            [
                "retrieve",
                "--encoder",
                "{d}/nomodel",
                "--topics",
                "{d}/topics.tsv",
                "--index",
                "{d}",
                "--output",
                "{d}/r.trec",
            ],
            None,
            "nomodel",
        ),
    ],
)
def test_bad_input_gives_one_error_line(corpus, tiny_model_dir, capsys, argv_tail, content, expected):
    if content is not None:
        name = "bad.trec" if "{d}/bad.trec" in argv_tail else "bad.tsv"
        (corpus / name).write_text(content)
    argv = [a.format(d=corpus, m=tiny_model_dir) for a in argv_tail]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualenc: error: ") and expected in err[0], err


def test_mine_command(corpus, capsys):
    run = corpus / "run.trec"
    run.write_text("q0 Q0 d0000 1 3.0 t\nq0 Q0 d0005 2 2.0 t\nq0 Q0 d0006 3 1.0 t\nq1 Q0 d0007 1 1.0 t\n")
    out = corpus / "hn.jsonl"
    args = [
        "-q",
        "mine",
        "--run",
        str(run),
        "--qrels",
        str(corpus / "qrels.txt"),
        "--topics",
        str(corpus / "topics.tsv"),
    ]
    assert main([*args, "--depth", "3", "--output", str(out)]) == 0
    groups = {g["query_id"]: g for g in map(json.loads, out.read_text().splitlines())}
    # q0's positive is d0000 (qrels), so its negatives are the rest of its top 3; q1's only hit is its
    # positive
    assert groups["q0"]["positive_ids"] == ["d0000"] and groups["q0"]["negative_ids"] == ["d0005", "d0006"]
    assert groups["q1"]["negative_ids"] == []
    assert groups["q0"]["query"] == (corpus / "topics.tsv").read_text().splitlines()[0].split("\t")[1]


def test_eval_script_end_to_end(tiny_model_dir, corpus, capsys):
    """eval_cli.main (what eval/*.py run): pipeline + baseline + table + JSON report with provenance."""
    eval_main = load_script("eval/eval_common.py").main

    run = corpus / "baseline.trec"
    run.write_text("q0 Q0 d0000 1 2.0 t\nq1 Q0 d0007 1 1.0 t\n")
    defaults = {
        "collection": str(corpus / "collection.tsv"),
        "topics": str(corpus / "topics.tsv"),
        "qrels": str(corpus / "qrels.txt"),
        "measures": "RR@10 nDCG@10",
        "baselines": [f"base={run}"],
    }
    argv = [
        "--model",
        str(tiny_model_dir),
        "--work-dir",
        str(corpus / "work"),
        "--label",
        "tiny",
        "--device",
        "cpu",
    ]
    report = eval_main("test_eval", defaults, "test", argv)
    assert set(report["measures"]) == {"RR@10", "nDCG@10"} and report["counts"]["docs"] == 120
    assert report["baselines"]["base"]["measures"]["RR@10"] == pytest.approx(2 / 6)
    assert report["commit"] and report["versions"]["torch"] and report["timings"]["encode_corpus_s"] > 0
    saved = json.loads((corpus / "work" / "report.json").read_text())
    assert saved["measures"] == report["measures"]
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tiny ") for line in lines) and any(line.startswith("base ") for line in lines)
    again = eval_main("test_eval", defaults, "test", argv)  # second run reuses the corpus embeddings
    assert again["measures"] == report["measures"]
    # a FAISS index (HNSW8 over 120 points is exact here) is built once and reused while the embeddings stay
    hnsw = eval_main("test_eval", defaults, "test", [*argv, "--factory", "HNSW8"])
    index_meta = corpus / "work" / "index-HNSW8" / "index_meta.json"
    built = index_meta.stat().st_mtime_ns
    assert hnsw["measures"] == report["measures"]
    assert (
        eval_main("test_eval", defaults, "test", [*argv, "--factory", "HNSW8"])["measures"]
        == hnsw["measures"]
    )
    assert index_meta.stat().st_mtime_ns == built  # not rebuilt
