"""eval/compare_training.py: summaries per run and per name (seed mean ± std), paired tests, clear errors."""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script

from dualenc.errors import InputError


@pytest.fixture(scope="module")
def compare() -> dict:
    """The script's namespace (its functions, and those it imports from its sibling modules)."""
    return vars(load_script("eval/compare_training.py"))


def _make_run(root: Path, name: str, ndcg: float, wall: float, steps=(5, 10)) -> Path:
    run = root / name
    run.mkdir()
    log = [{"step": s, "loss": 2.0 / s, "step_time_s": 0.5 * s} for s in steps]
    log += [{"step": steps[-1], "dev/nDCG@10": ndcg - 0.1}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    summary = {
        "steps": steps[-1],
        "best_step": steps[-1],
        "best_metric": ndcg - 0.1,
        "eval_measure": "nDCG@10",
        "wall_s": wall,
        "peak_rss_gib": 1.5,
    }
    (run / "train_summary.json").write_text(json.dumps(summary))
    report = {"measures": {"nDCG@10": ndcg, "R@100": 0.9}, "commit": "abc"}
    report |= {"config": {"model": str(run / "best_model")}, "run_file": str(run / "eval" / "run.trec")}
    (run / "test.json").write_text(json.dumps(report))
    return run


def test_wall_time_of_a_resumed_run_with_session_time_only_is_left_out(compare, tmp_path, capsys):
    full = _make_run(tmp_path, "a_s1", 0.70, 100.0)
    partial = _make_run(tmp_path, "a_s2", 0.66, 30.0)
    summary = json.loads((partial / "train_summary.json").read_text())
    (partial / "train_summary.json").write_text(json.dumps({**summary, "resumed_from": "ckpt"}))
    resumed = _make_run(tmp_path, "b_s1", 0.60, 90.0)  # written by a dualenc that carries the clock over
    summary = json.loads((resumed / "train_summary.json").read_text())
    (resumed / "train_summary.json").write_text(
        json.dumps({**summary, "resumed_from": "ckpt", "session_wall_s": 20.0})
    )
    result = compare["main"](
        [f"a={full}", f"a={partial}", f"b={resumed}", "--no-tests", "--out", str(tmp_path / "c.json")]
    )
    assert [r["wall_s"] for r in result["runs"]] == [100.0, None, 90.0]
    assert [r["wall_s"] for r in result["by_name"]] == [100.0, 90.0]
    assert "a_s2: resumed" in capsys.readouterr().err


def test_tables_json_and_seed_aggregate(compare, tmp_path, capsys):
    a1 = _make_run(tmp_path, "a_s1", 0.70, 100.0)
    a2 = _make_run(tmp_path, "a_s2", 0.66, 120.0)
    b1 = _make_run(tmp_path, "b_s1", 0.60, 50.0)
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"measures": {"nDCG@10": 0.645, "R@100": 0.925}}))
    out = tmp_path / "cmp.json"
    result = compare["main"](
        [f"a={a1}", f"a={a2}", f"b={b1}", "--zero-shot", str(zero), "--out", str(out), "--no-tests"]
    )
    assert json.loads(out.read_text())["table"] == result["table"]
    a = next(r for r in result["by_name"] if r["name"] == "a")
    assert a["seeds"] == 2
    assert a["nDCG@10"] == pytest.approx(0.68)
    assert a["nDCG@10 std"] == pytest.approx(statistics.stdev([0.70, 0.66]))
    assert a["wall_s"] == pytest.approx(110.0)
    b = next(r for r in result["by_name"] if r["name"] == "b")
    assert b["nDCG@10 std"] is None  # one seed: no spread
    first = result["runs"][0]
    assert first["median_step_s"] == pytest.approx(3.75)  # median of 2.5 and 5.0
    assert [tuple(p) for p in first["curves"]["loss"]] == [(5, 0.4), (10, 0.2)]
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "0.6450" in printed and "a_s2" in printed


def test_plot_is_written(compare, tmp_path):
    pytest.importorskip("matplotlib")
    run = _make_run(tmp_path, "r", 0.7, 10.0)
    zero_dev = tmp_path / "zero_dev.json"
    zero_dev.write_text(json.dumps({"measures": {"nDCG@10": 0.5}}))
    png = tmp_path / "c.png"
    compare["main"](
        [f"r={run}", "--out", str(tmp_path / "c.json"), "--plot", str(png), "--zero-shot-dev", str(zero_dev)]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_file_and_line(compare, tmp_path, capsys):
    run = _make_run(tmp_path, "r", 0.7, 10.0)
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(SystemExit) as exc:
        compare["main"]([f"r={run}", "--out", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "train_log.jsonl:4" in err and "invalid JSON" in err
    with pytest.raises(SystemExit):
        compare["main"]([f"{run}", "--out", str(tmp_path / "c.json")])
    assert "expected NAME=RUN_DIR" in capsys.readouterr().err
    (run / "test.json").unlink()
    with pytest.raises(InputError, match="test.json"):
        compare["summarise_run"]("r", run, "test.json")


def _exact_sign_flip_pvalue(diff: np.ndarray) -> float:
    """Every one of the 2^n sign patterns: P(|mean of flipped diff| >= |observed mean|)."""
    observed = abs(diff.mean())
    flips = np.array(list(itertools.product([-1.0, 1.0], repeat=diff.size)))  # (2^n, n)
    return float(np.mean(np.abs((flips * diff).mean(1)) >= observed - 1e-12))


def test_randomization_test_equals_exact_enumeration(compare):
    rng = np.random.default_rng(0)
    a, b = rng.random(10), rng.random(10)
    b[:6] -= 0.3  # a real difference on most queries
    exact = _exact_sign_flip_pvalue(a - b)
    assert compare["paired_randomization_pvalue"](a, b, num_resamples=5000) == pytest.approx(exact, abs=1e-12)
    assert compare["paired_randomization_pvalue"](a, a) == 1.0


def _scored_run(root: Path, name: str, ranks: dict[str, int], qrels: Path) -> Path:
    """A run dir whose test report points at a TREC run putting each query's relevant doc at ``ranks[q]``."""
    run = _make_run(root, name, 0.5, 10.0)
    lines = []
    for qid, rank in ranks.items():
        docs = [f"x{i}" for i in range(1, 6)]
        docs.insert(rank - 1, f"rel{qid}")
        lines += [f"{qid} Q0 {d} {r} {10 - r} t" for r, d in enumerate(docs, start=1)]
    (run / "run.trec").write_text("\n".join(lines) + "\n")
    report = {"measures": {"RR@10": 0.0}, "run_file": str(run / "run.trec")}
    report["config"] = {"qrels": str(qrels), "model": str(run / "best_model")}
    (run / "test.json").write_text(json.dumps(report))
    return run


def test_paired_comparison_against_hand_computed_reciprocal_ranks(compare, tmp_path):
    queries = [f"q{i}" for i in range(8)]
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("".join(f"{q} 0 rel{q} 1\n" for q in queries))
    base = _scored_run(tmp_path, "base", {q: 2 for q in queries}, qrels)  # RR 1/2 everywhere
    better = {q: (1 if i < 6 else 3) for i, q in enumerate(queries)}  # RR 1 on six queries, 1/3 on two
    seed_a = _scored_run(tmp_path, "a1", better, qrels)
    seed_b = _scored_run(tmp_path, "a2", {q: 1 for q in queries}, qrels)  # RR 1 everywhere
    runs = [
        compare["summarise_run"](n, d, "test.json") for n, d in (("base", base), ("a", seed_a), ("a", seed_b))
    ]
    (row,) = compare["paired_comparison"](runs, "base", "RR@10")
    per_query = np.array([(1 + 1) / 2] * 6 + [(1 / 3 + 1) / 2] * 2)  # the two seeds averaged per query
    diff = per_query - 0.5
    assert row["mean diff"] == pytest.approx(diff.mean())
    assert (row["better"], row["worse"], row["queries"]) == (8, 0, 8)
    assert row["p randomization"] == pytest.approx(_exact_sign_flip_pvalue(diff), abs=1e-12)
    with pytest.raises(InputError, match="baseline 'nope'"):
        compare["paired_comparison"](runs, "nope", "RR@10")
    bare = _make_run(tmp_path, "bare", 0.5, 1.0)  # its test.json names a run file that is not there
    with pytest.raises(InputError, match="not an eval report"):
        compare["paired_comparison"](
            [runs[0], compare["summarise_run"]("b", bare, "test.json")], "base", "RR@10"
        )


def test_a_report_of_another_runs_model_is_refused(compare, tmp_path, capsys):
    """A run dir copied as another seed keeps its source's test.json (the source's model and run file):
    refused with one error naming the report and the path that gives it away, before anything is written; so
    is a report that does not say what it scored."""
    source = _make_run(tmp_path, "cache_s42", 0.70, 100.0)
    (source / "best_model").mkdir()
    copy = tmp_path / "cache_s43"
    shutil.copytree(source, copy)
    out = tmp_path / "c.json"
    with pytest.raises(SystemExit) as exc:
        compare["main"]([f"a={source}", f"a={copy}", "--no-tests", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(copy / "test.json") in err and "is not inside the run dir" in err
    assert f"config.model {str(source / 'best_model')!r}" in err and not out.exists()
    report = json.loads((copy / "test.json").read_text())
    report["config"]["model"] = str(copy / "best_model")  # its own model; the run file still the source's
    (copy / "test.json").write_text(json.dumps(report))
    with pytest.raises(InputError, match="its run_file .* is not inside the run dir"):
        compare["summarise_run"]("a", copy, "test.json")
    del report["run_file"]
    (copy / "test.json").write_text(json.dumps(report))
    with pytest.raises(InputError, match="names no run_file"):
        compare["summarise_run"]("a", copy, "test.json")
    report["run_file"] = str(copy / "eval" / "run.trec")
    (copy / "test.json").write_text(json.dumps(report))
    assert compare["summarise_run"]("a", copy, "test.json")["test"]["nDCG@10"] == 0.70


def test_mean_pairwise_cosine_equals_brute_force(compare):
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(37, 5))  # (37, 5)
    emb = normal * rng.uniform(0.1, 3.0, size=(37, 1)) + 0.7  # (37, 5) unnormalised, a shared offset
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T  # (37, 37)
    expected = (cos.sum() - np.trace(cos)) / (37 * 36)
    assert compare["mean_pairwise_cosine"](emb, block_rows=8) == pytest.approx(expected, abs=1e-12)
    assert compare["mean_pairwise_cosine"](np.tile([[1.0, 2.0]], (4, 1))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="row 2 is the zero vector"):
        compare["mean_pairwise_cosine"](np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_doc_mean_cos_from_the_eval_reports_corpus_embeddings(compare, tmp_path):
    from dualenc.io.embeddings import write_meta, write_shard

    run = _make_run(tmp_path, "a_s1", 0.70, 100.0)
    work = tmp_path / "a_s1" / "eval"
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)  # cosines 0, 1/√2, 1/√2
    for index, rows in enumerate([emb[:2], emb[2:]]):
        write_shard(work / "corpus", index, 2, [f"d{index}{i}" for i in range(len(rows))], rows)
    write_meta(work / "corpus", {"dim": 2, "num_shards": 2, "count": 3})
    report = json.loads((run / "test.json").read_text())
    (run / "test.json").write_text(
        json.dumps({**report, "config": {**report["config"], "work_dir": str(work)}})
    )
    plain = _make_run(tmp_path, "b_s1", 0.60, 50.0)  # no work dir: no figure
    result = compare["main"]([f"a={run}", f"b={plain}", "--no-tests", "--out", str(tmp_path / "c.json")])
    assert result["runs"][0]["doc_mean_cos"] == pytest.approx(2 / 3 * 2**-0.5, abs=1e-7)
    assert result["runs"][1]["doc_mean_cos"] is None
    assert result["by_name"][0]["doc_mean_cos"] == pytest.approx(2 / 3 * 2**-0.5, abs=1e-7)
