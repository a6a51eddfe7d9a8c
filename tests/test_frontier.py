"""eval/frontier.py: run discovery, the methods table, Pareto fronts, paired tests, JSON, markdown and PNG."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from helpers import load_script

from dualenc.training.cost_meter import PHASES

QUERIES = [f"q{i}" for i in range(6)]
# ten methods as on SciFact (docs/results.md): name -> (nDCG@10 per seed, wall minutes, peak RSS GiB)
SCIFACT_LIKE = {
    "inbatch_b32": ([0.6782, 0.6773, 0.6751], 16.4, 5.73),
    "inbatch_b64": ([0.6841, 0.6802], 17.9, 7.41),
    "gradcache_b128": ([0.6893, 0.6871], 24.8, 5.95),
    "inbatch_b32_5ep": ([0.6811, 0.6790], 27.3, 5.71),
    "mined_b32": ([0.6952, 0.6901], 22.1, 6.64),
    "cache_b32": ([0.6933, 0.7023, 0.7001], 29.9, 9.88),
    "cache_b16": ([0.6962], 34.6, 8.12),
    "cache_sce_b32": ([0.6870, 0.6911], 28.4, 9.60),
    "st_mnrl_b32": ([0.6768, 0.6790], 15.2, 5.20),
    "st_cmnrl_b128": ([0.6885, 0.6860], 21.7, 5.52),
}


@pytest.fixture(scope="module")
def frontier() -> dict:
    """The script's namespace (its functions, and those it imports from compare_training)."""
    return vars(load_script("eval/frontier.py"))


def _make_run(
    root: Path, dirname: str, ndcg: float, wall_s: float | None, rss: float, ranks: tuple = (2,) * 6
) -> Path:
    """A finished run dir: train_summary.json, train_log.jsonl, test.json whose run file puts the relevant
    document of query i at ``ranks[i]`` (so its nDCG@10 is 1 / log2(rank + 1))."""
    root.mkdir(parents=True, exist_ok=True)
    qrels = root / "qrels.txt"
    if not qrels.exists():
        qrels.write_text("".join(f"{q} 0 rel{q} 1\n" for q in QUERIES))
    run = root / dirname
    run.mkdir(parents=True)
    lines = []
    for q, rank in zip(QUERIES, ranks, strict=True):
        docs = [f"x{i}" for i in range(1, 6)]
        docs.insert(rank - 1, f"rel{q}")
        lines += [f"{q} Q0 {d} {r} {10 - r} t" for r, d in enumerate(docs, start=1)]
    (run / "run.trec").write_text("\n".join(lines) + "\n")
    summary = {"steps": 66, "best_step": 66, "best_metric": ndcg + 0.05, "eval_measure": "nDCG@10"}
    summary |= {"wall_s": wall_s, "peak_rss_gib": rss}
    (run / "train_summary.json").write_text(json.dumps(summary))
    log = [{"step": 5, "loss": 0.3, "step_time_s": 6.0}, {"step": 66, "dev/nDCG@10": ndcg + 0.05}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    report = {"measures": {"nDCG@10": ndcg, "R@100": 0.9 + ndcg / 100}, "run_file": str(run / "run.trec")}
    config = {"qrels": str(qrels), "model": str(run / "best_model")}  # as eval/beir_scifact.py names it
    (run / "test.json").write_text(json.dumps(report | {"config": config}))
    return run


def _zero_shot(root: Path, ndcg: float = 0.6451) -> Path:
    path = root / "zeroshot.json"
    path.write_text(json.dumps({"measures": {"nDCG@10": ndcg, "R@100": 0.925}}))
    return path


def scifact_like(root: Path) -> Path:
    """ROOT with the ten methods of SCIFACT_LIKE, one dir per seed."""
    for index, (name, (scores, wall_min, rss)) in enumerate(SCIFACT_LIKE.items()):
        for seed, ndcg in zip((42, 7, 1234)[: len(scores)], scores, strict=True):
            ranks = tuple(1 + (index * 7 + seed + i * i) % 4 for i in range(len(QUERIES)))
            _make_run(root, f"{name}_s{seed}", ndcg, wall_min * 60 + seed / 1000, rss, ranks)
    return root


def test_pareto_front_against_hand_computed_answer(frontier):
    points = {
        "a": (0.70, 30.0),  # the best quality
        "b": (0.68, 20.0),
        "b_tie": (0.68, 20.0),  # equal to b: neither dominates the other
        "c": (0.68, 25.0),  # dominated by b (same quality, costlier)
        "d": (0.65, 10.0),  # the cheapest, but e is better at that cost
        "e": (0.66, 10.0),  # dominates d (better at the same cost)
        "f": (0.70, 35.0),  # dominated by a (same quality, costlier)
        "g": (0.60, 40.0),  # dominated by everything
        "h": (0.99, None),  # no cost: on no front
    }
    assert frontier["pareto_front"](points) == ["a", "b", "b_tie", "e"]
    assert frontier["pareto_front"]({"only": (0.5, 1.0)}) == ["only"]


def test_discovery_leaves_unfinished_runs_out_and_names_a_broken_file(frontier, tmp_path, capsys):
    _make_run(tmp_path, "base_s42", 0.67, 600.0, 5.0)
    _make_run(tmp_path, "base_s7", 0.66, 660.0, 5.5)
    _make_run(tmp_path, "cache_b32_s1", 0.70, 1200.0, 9.0)
    (tmp_path / "late_s3").mkdir()  # started, no summary or test report yet
    (tmp_path / "late_s3" / "train_summary.json").write_text("{}")
    (tmp_path / "zeroshot").mkdir()  # not a run
    found, unfinished = frontier["discover"](tmp_path)
    expected = [("base", "base_s7"), ("base", "base_s42"), ("cache_b32", "cache_b32_s1")]  # by seed, not name
    assert [(name, sub.name) for name, sub in found] == expected
    assert unfinished == [str(tmp_path / "late_s3")]
    result = frontier["main"]([str(tmp_path), "--baseline", "base", "--out", str(tmp_path / "f.json")])
    assert "late_s3: not finished, left out" in capsys.readouterr().err
    assert [(m["name"], m["seeds"]) for m in result["methods"]] == [("base", 2), ("cache_b32", 1)]
    assert [(r["name"], r["seed"]) for r in result["runs"]] == [("base", 7), ("base", 42), ("cache_b32", 1)]
    (tmp_path / "base_s7" / "test.json").write_text("{broken")
    with pytest.raises(SystemExit) as exc:
        frontier["main"]([str(tmp_path), "--baseline", "base", "--out", str(tmp_path / "f.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "base_s7" / "test.json") in err and "invalid JSON" in err


def test_a_report_of_another_runs_model_is_refused_and_a_deleted_model_is_not(frontier, tmp_path, capsys):
    """A run dir copied as another seed keeps its source's test.json: scores of the source's model under the
    copy's name. Refused before anything is written, naming the file and the path that gives it away; so is
    a report that does not say what it scored. A run whose model was deleted after scoring (base_s42 has no
    best_model) keeps its place: its report names a folder of its own name."""
    root = tmp_path / "runs"
    _make_run(root, "base_s42", 0.67, 600.0, 5.0)
    source = _make_run(root, "cache_b32_s42", 0.70, 1200.0, 9.0)
    (source / "best_model").mkdir()  # exists: where it lies is compared, not only its folder's name
    out = tmp_path / "f.json"
    args = ["--baseline", "base", "--out", str(out)]
    assert len(frontier["main"]([str(root), *args])["runs"]) == 2
    out.unlink()

    shutil.copytree(source, root / "cache_b32_s43")
    with pytest.raises(SystemExit) as exc:
        frontier["main"]([str(root), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(root / "cache_b32_s43" / "test.json") in err
    assert f"config.model {str(source / 'best_model')!r} is not inside the run dir" in err
    shutil.rmtree(source)  # the source gone, the copy's report still names it
    with pytest.raises(SystemExit):
        frontier["main"]([str(root), *args])
    assert "config.model" in capsys.readouterr().err

    copy = root / "cache_b32_s43"
    report = json.loads((copy / "test.json").read_text())
    report["config"]["model"] = str(copy / "best_model")  # the model is its own, the run file is not
    (copy / "test.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit):
        frontier["main"]([str(root), *args])
    assert "its run_file" in capsys.readouterr().err
    del report["config"]["model"]
    (copy / "test.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit):
        frontier["main"]([str(root), *args])
    assert "names no config.model" in capsys.readouterr().err
    assert not out.exists()


def test_methods_table_against_hand_computation(frontier, tmp_path, capsys):
    _make_run(tmp_path, "base_s1", 0.67, 1200.0, 5.0)
    _make_run(tmp_path, "base_s2", 0.69, 1800.0, 6.0)
    _make_run(tmp_path, "big_s1", 0.71, 3600.0, 10.0)
    _make_run(tmp_path, "slow_s1", 0.68, None, 4.0)  # no wall time: quality yes, time no
    _make_run(tmp_path, "slow_s2", 0.66, 7200.0, 4.5)
    result = frontier["main"](
        [str(tmp_path), "--baseline", "base", "--zero-shot", str(_zero_shot(tmp_path, 0.64))]
        + ["--out", str(tmp_path / "f.json")]
    )
    by_name = {m["name"]: m for m in result["methods"]}
    base, big, slow = by_name["base"], by_name["big"], by_name["slow"]
    assert base["nDCG@10"] == pytest.approx(0.68)
    assert base["nDCG@10 std"] == pytest.approx(math.sqrt(((0.67 - 0.68) ** 2 + (0.69 - 0.68) ** 2) / 1))
    assert big["nDCG@10 std"] is None
    assert base["wall_min"] == pytest.approx(25.0)  # (20 + 30) / 2 minutes
    assert base["peak_rss_gib"] == pytest.approx(6.0)  # the max over seeds
    assert base["gain_per_cpu_hour"] == pytest.approx((0.68 - 0.64) / (1500 / 3600))
    assert base["gain_per_gib"] == pytest.approx((0.68 - 0.64) / 6.0)
    assert big["gain_per_cpu_hour"] == pytest.approx(0.07)  # 0.07 in exactly one hour
    assert slow["wall_min"] == pytest.approx(120.0)  # only the seed with a wall time
    assert slow["nDCG@10"] == pytest.approx(0.67)  # both seeds
    assert slow["gain_per_gib"] == pytest.approx((0.67 - 0.64) / 4.5)
    # time: base (0.68, 25 min) and big (0.71, 60) on it, slow (0.67, 120) dominated; memory: slow 4.5 GiB
    assert result["fronts"] == {"time": ["base", "big"], "memory": ["base", "big", "slow"]}
    assert [by_name[n]["front_time"] for n in ("base", "big", "slow")] == [True, True, False]
    assert "no wall time" in capsys.readouterr().err
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["fronts"] == result["fronts"] and saved["commit"] and "versions" in saved


def test_paired_rows_for_every_method_and_a_missing_baseline(frontier, tmp_path, capsys):
    dcg = [0.0] + [1 / math.log2(rank + 1) for rank in range(1, 11)]  # dcg[r]: the relevant doc at rank r
    _make_run(tmp_path, "base_s1", 0.6, 600.0, 5.0, ranks=(2, 2, 2, 2, 3, 1))
    _make_run(tmp_path, "top_s1", 0.7, 900.0, 6.0, ranks=(1, 1, 1, 1, 1, 1))
    _make_run(tmp_path, "top_s2", 0.7, 900.0, 6.0, ranks=(1, 1, 1, 1, 3, 1))
    _make_run(tmp_path, "low_s1", 0.5, 300.0, 4.0, ranks=(3, 3, 3, 4, 3, 3))
    result = frontier["main"]([str(tmp_path), "--baseline", "base", "--out", str(tmp_path / "f.json")])
    rows = {r["name"]: r for r in result["paired"]}
    assert sorted(rows) == ["low", "top"] and all(r["vs"] == "base" for r in rows.values())
    top = [1 - dcg[2]] * 4 + [(1 + dcg[3]) / 2 - dcg[3], 0.0]  # per query, the two seeds averaged
    low = [dcg[3] - dcg[2]] * 3 + [dcg[4] - dcg[2], 0.0, dcg[3] - 1]
    assert rows["top"]["mean diff"] == pytest.approx(statistics.fmean(top))
    assert rows["low"]["mean diff"] == pytest.approx(statistics.fmean(low))
    assert (rows["top"]["better"], rows["top"]["worse"], rows["top"]["queries"]) == (5, 0, 6)
    assert (rows["low"]["better"], rows["low"]["worse"]) == (0, 5)
    assert "p randomization" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        frontier["main"]([str(tmp_path), "--baseline", "nope", "--out", str(tmp_path / "g.json")])
    assert exc.value.code == 2
    assert "baseline 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_pair_tests_a_method_against_its_control_and_refuses_bad_pairs(frontier, tmp_path, capsys):
    dcg = [0.0] + [1 / math.log2(rank + 1) for rank in range(1, 11)]  # dcg[r]: the relevant doc at rank r
    _make_run(tmp_path, "base_s1", 0.6, 600.0, 5.0, ranks=(2, 2, 2, 2, 2, 2))
    _make_run(tmp_path, "ctrl_s1", 0.6, 600.0, 5.0, ranks=(3, 3, 2, 2, 1, 4))
    _make_run(tmp_path, "cache_s1", 0.7, 900.0, 6.0, ranks=(1, 2, 1, 2, 1, 3))
    out, md = tmp_path / "f.json", tmp_path / "f.md"
    argv = [str(tmp_path), "--baseline", "base", "--out", str(out), "--markdown", str(md)]
    result = frontier["main"]([*argv, "--pair", "cache=ctrl"])
    pairs = [(r["name"], r["vs"]) for r in result["paired"]]
    assert pairs == [("cache", "base"), ("ctrl", "base"), ("cache", "ctrl")]
    row = result["paired"][-1]
    diffs = [1 - dcg[3], dcg[2] - dcg[3], 1 - dcg[2], 0.0, 0.0, dcg[3] - dcg[4]]  # by hand, query by query
    assert row["mean diff"] == pytest.approx(statistics.fmean(diffs))
    assert (row["better"], row["worse"], row["queries"]) == (4, 0, 6)
    assert "| cache | ctrl | 6 |" in md.read_text()
    assert json.loads(out.read_text())["paired"][-1]["vs"] == "ctrl"
    bad = {
        "cache": "expected METHOD=CONTROL",
        "cache=cache": "expected METHOD=CONTROL",
        "cache=nope": "'nope' is not one of the finished methods",
        "cache=base": "already tested against baseline",
    }
    for spec, message in bad.items():
        out.unlink(missing_ok=True)
        with pytest.raises(SystemExit) as exc:
            frontier["main"]([*argv, "--pair", spec])
        assert exc.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        frontier["main"]([*argv, "--pair", "cache=ctrl", "--pair", "cache=ctrl"])
    assert "given twice" in capsys.readouterr().err


def _markdown_methods(path: Path) -> list[list[str]]:
    """The cells of the rows of the first markdown table of ``path`` (the methods)."""
    lines = path.read_text().split("\n\n")[0].splitlines()
    assert lines[0].startswith("| method | seeds | nDCG@10 (mean ± std) |") and set(lines[1]) <= set("|- ")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_name_equals_dir_specs_a_run_without_log_and_markdown(frontier, tmp_path):
    one = _make_run(tmp_path, "r1", 0.66, 600.0, 5.0)
    two = _make_run(tmp_path, "r2", 0.70, 900.0, 6.0, (1, 2, 1, 3, 1, 2))
    (two / "train_log.jsonl").unlink()  # as a run written by another trainer: the two JSON files only
    md = tmp_path / "f.md"
    argv = [f"one={one}", f"two={two}", "--baseline", "one", "--out", str(tmp_path / "f.json")]
    result = frontier["main"]([*argv, "--markdown", str(md)])
    assert [(r["name"], r["seed"], r["wall_s"]) for r in result["runs"]] == [
        ("one", None, 600.0),
        ("two", None, 900.0),
    ]
    rows = _markdown_methods(md)
    assert [row[:7] for row in rows] == [  # no cpu_s in these summaries: "CPU h" is "-"
        ["one", "1", "0.6600", "0.9066", "10.0", "-", "5.00"],
        ["two", "1", "0.7000", "0.9070", "15.0", "-", "6.00"],
    ]
    assert "| two | one | 6 |" in md.read_text()  # the paired table: method, baseline, queries, ...


def test_png_and_json_of_ten_methods(frontier, tmp_path):
    pytest.importorskip("matplotlib")
    root = scifact_like(tmp_path / "runs")
    png, out = tmp_path / "f.png", tmp_path / "f.json"
    zero = str(_zero_shot(tmp_path))
    md = tmp_path / "f.md"
    argv = [
        str(root),
        "--baseline",
        "inbatch_b32",
        "--zero-shot",
        zero,
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    frontier["main"]([*argv, "--markdown", str(md)])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    saved = json.loads(out.read_text())
    assert len(saved["methods"]) == len(SCIFACT_LIKE) and len(saved["paired"]) == len(SCIFACT_LIKE) - 1
    # by hand from SCIFACT_LIKE: the cheapest, then each method better than every cheaper one (by name)
    assert saved["fronts"] == {
        "time": ["cache_b32", "inbatch_b64", "mined_b32", "st_cmnrl_b128", "st_mnrl_b32"],
        "memory": ["cache_b16", "cache_b32", "gradcache_b128", "mined_b32", "st_cmnrl_b128", "st_mnrl_b32"],
    }
    rows = {row[0]: row for row in _markdown_methods(md)}
    assert sorted(rows) == sorted(SCIFACT_LIKE)  # one row per method
    scores = SCIFACT_LIKE["cache_b32"][0]
    assert rows["cache_b32"][2] == f"{statistics.fmean(scores):.4f} ± {statistics.stdev(scores):.4f}"
    assert rows["cache_b32"][9:] == ["yes", "yes"] and rows["inbatch_b32"][9:] == ["", ""]


def test_time_is_cpu_time_when_every_run_recorded_it(frontier, tmp_path):
    """cpu_s in every summary: the time front and the gain per CPU-hour use CPU hours (the wall time can say
    otherwise: here the slower-by-wall method is the cheaper by CPU); one run without it: wall time."""
    slow_wall = _make_run(tmp_path, "a_s1", 0.70, 3600.0, 5.0, (1, 2, 1, 3, 1, 2))
    fast_wall = _make_run(tmp_path, "b_s1", 0.66, 1800.0, 5.0)
    for run, cpu in ((slow_wall, 1800.0), (fast_wall, 7200.0)):
        summary = json.loads((run / "train_summary.json").read_text())
        (run / "train_summary.json").write_text(json.dumps(summary | {"cpu_s": cpu}))
    argv = [str(tmp_path), "--baseline", "b", "--out", str(tmp_path / "f.json")]
    rows = {r["name"]: r for r in frontier["main"](argv)["methods"]}
    assert rows["a"]["time_is"] == "cpu" and rows["a"]["time_h"] == 0.5 and rows["b"]["cpu_h"] == 2.0
    assert rows["a"]["front_time"] and not rows["b"]["front_time"]  # better and cheaper by CPU time

    summary = json.loads((fast_wall / "train_summary.json").read_text())
    del summary["cpu_s"]
    (fast_wall / "train_summary.json").write_text(json.dumps(summary))
    rows = {r["name"]: r for r in frontier["main"](argv)["methods"]}
    assert rows["a"]["time_is"] == "wall" and rows["a"]["time_h"] == 1.0 and rows["b"]["time_h"] == 0.5
    assert rows["a"]["front_time"] and rows["b"]["front_time"]  # by wall time b is the cheaper one


def _with_costs(run: Path, cpu_s: float, dev_eval_cpu_s: float | None) -> None:
    """Sets ``cpu_s`` and, unless None, a ``cost_by_phase`` whose dev evaluation took ``dev_eval_cpu_s``."""
    summary = json.loads((run / "train_summary.json").read_text()) | {"cpu_s": cpu_s}
    summary.pop("cost_by_phase", None)
    if dev_eval_cpu_s is not None:
        phases = {p: {"cpu_s": 0.0, "wall_s": 0.0} for p in ("training", "cache_fill", "checkpoint")}
        summary["cost_by_phase"] = phases | {"dev_eval": {"cpu_s": dev_eval_cpu_s, "wall_s": 1.0}}
    (run / "train_summary.json").write_text(json.dumps(summary))


def test_cpu_hours_without_dev_evaluation_where_every_run_recorded_them(frontier, tmp_path, capsys):
    """The column "CPU h excl. dev": a method's mean CPU hours less its runs' dev evaluations, "-" for a
    method one of whose runs predates cost_by_phase, absent from a table no method of which has it; kept in
    the JSON and rebuilt from it; a cost_by_phase without a dev_eval number is refused naming its file."""
    costs = {"base_s1": (7200.0, 3600.0), "base_s2": (5400.0, 1800.0), "cache_s1": (9000.0, 1800.0)}
    costs |= {"old_s1": (3600.0, 900.0), "old_s2": (3600.0, None)}
    for dirname, (cpu, dev) in costs.items():
        _with_costs(_make_run(tmp_path / "r", dirname, 0.7, cpu, 5.0), cpu, dev)
    argv = [str(tmp_path / "r"), "--baseline", "base", "--out", str(tmp_path / "f.json")]
    result = frontier["main"](argv)
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["base"]["cpu_h_no_dev"] == pytest.approx((3600 + 3600) / 2 / 3600)  # 1.0 h of 1.75 h
    assert rows["cache"]["cpu_h_no_dev"] == pytest.approx(2.0) and rows["cache"]["cpu_h"] == 2.5
    assert rows["old"]["cpu_h_no_dev"] is None and rows["old"]["cpu_h"] == 1.0
    assert "CPU h excl. dev" in result["table"].splitlines()[0]
    cells = {name: frontier["_cells"](row, "nDCG@10") for name, row in rows.items()}
    assert [cells[n]["CPU h excl. dev"] for n in ("base", "cache", "old")] == ["1.000", "2.000", "-"]
    assert [cells[n]["CPU h"] for n in ("base", "cache", "old")] == ["1.750", "2.500", "1.000"]
    assert {r["seed"]: r["dev_eval_cpu_s"] for r in result["runs"] if r["name"] == "old"} == {
        1: 900.0,
        2: None,
    }
    rebuilt = frontier["main"](
        [str(tmp_path / "f.json"), "--baseline", "base", "--out", str(tmp_path / "g.json")]
    )
    assert rebuilt["methods"] == result["methods"] and rebuilt["table"] == result["table"]
    page = frontier["markdown"](result["methods"], [], "nDCG@10", None)
    assert "| CPU h excl. dev |" in page and "| 2.000 |" in page

    for sub in (tmp_path / "r").iterdir():  # no run recorded cost_by_phase: no such column
        if sub.is_dir():
            _with_costs(sub, 3600.0, None)
    table = frontier["main"](argv)["table"]
    assert "excl. dev" not in table and "CPU h" in table

    _with_costs(tmp_path / "r" / "cache_s1", 9000.0, 1800.0)
    broken = tmp_path / "r" / "cache_s1" / "train_summary.json"
    summary = json.loads(broken.read_text())
    del summary["cost_by_phase"]["dev_eval"]
    broken.write_text(json.dumps(summary))
    with pytest.raises(SystemExit):
        frontier["main"](argv)
    err = capsys.readouterr().err
    assert str(broken) in err and "cost_by_phase has no dev_eval cpu_s number" in err


def test_extra_cost_adds_the_mining_round_to_each_run_of_its_method(frontier, tmp_path, capsys):
    """--extra-cost mined=FILE: FILE's CPU seconds (mining_cpu.tsv lines) join every mined run's CPU time, and
    the fronts follow: mined is cheaper than the baseline by training alone, dearer once its mining counts."""
    runs = {"base_s1": (0.66, 3600.0), "mined_s1": (0.70, 1800.0), "mined_s2": (0.70, 2700.0)}
    for dirname, (ndcg, cpu) in runs.items():
        ranks = (1, 2, 1, 3, 1, 2) if ndcg > 0.67 else (2,) * 6
        run = _make_run(tmp_path / "r", dirname, ndcg, cpu, 5.0, ranks)
        summary = json.loads((run / "train_summary.json").read_text())
        (run / "train_summary.json").write_text(json.dumps(summary | {"cpu_s": cpu}))
    argv = [str(tmp_path / "r"), "--baseline", "base", "--out", str(tmp_path / "f.json")]
    rows = {r["name"]: r for r in frontier["main"](argv)["methods"]}
    assert rows["mined"]["cpu_h"] == 0.625 and rows["mined"]["front_time"] and not rows["base"]["front_time"]

    cost = tmp_path / "mining_cpu.tsv"
    cost.write_text("encode\t5000.5\nretrieve\t120.25\nmine\t279.25\n")  # 5,400 s = 1.5 h
    result = frontier["main"]([*argv, "--extra-cost", f"mined={cost}"])
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["mined"]["cpu_h"] == 0.625 + 1.5 and rows["base"]["cpu_h"] == 1.0
    assert rows["mined"]["extra_cpu_h"] == 1.5 and rows["base"]["extra_cpu_h"] == 0.0
    page = frontier["markdown"](list(rows.values()), [], "nDCG@10", 0.6451)
    assert "mined: its CPU h include 1.500 h spent before training." in page and "base: its" not in page
    assert rows["base"]["front_time"] and rows["mined"]["front_time"]  # now a trade-off: both on the front
    assert {r["name"]: r["extra_cpu_s"] for r in result["runs"]} == {"base": 0.0, "mined": 5400.0}

    cost.write_text("encode\t5000.5\nretrieve 120\n")
    with pytest.raises(SystemExit):
        frontier["main"]([*argv, "--extra-cost", f"mined={cost}"])
    assert f"{cost}:2: expected STEP<TAB>CPU_SECONDS, got 'retrieve 120'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        frontier["main"]([*argv, "--extra-cost", f"minde={cost}"])
    assert "'minde' is not one of the finished methods" in capsys.readouterr().err


def test_time_scale_puts_another_machines_runs_on_the_clock_of_the_others(frontier, tmp_path, capsys):
    """--time-scale B=2: the runs of root B (measured on a machine twice as fast) count twice their wall, CPU,
    dev-evaluation and mining time; the JSON keeps what was measured and the factor, the table says it, and a
    rebuild from the JSON scales nothing again."""
    times = {"a": {"base_s1": 3600.0, "mined_s1": 1800.0}, "b": {"mined_s2": 900.0}}
    for root, runs in times.items():
        for dirname, cpu in runs.items():
            ranks = (1, 2, 1, 3, 1, 2) if "mined" in dirname else (2,) * 6
            ndcg = 0.70 if "mined" in dirname else 0.66
            run = _make_run(tmp_path / root, dirname, ndcg, cpu * 0.6, 5.0, ranks)
            summary = json.loads((run / "train_summary.json").read_text())
            phases = {"dev_eval": {"cpu_s": cpu / 4}}
            (run / "train_summary.json").write_text(
                json.dumps(summary | {"cpu_s": cpu, "cost_by_phase": phases})
            )
    cost = tmp_path / "mining_cpu.tsv"
    cost.write_text("encode\t360\n")
    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "f.json"
    common = ["--baseline", "base", "--extra-cost", f"mined={cost}"]
    result = frontier["main"]([a, b, *common, "--time-scale", f"{b}=2", "--out", str(out)])
    runs = {(r["name"], r["seed"]): r for r in result["runs"]}
    scaled = runs[("mined", 2)]
    assert (scaled["time_scale"], scaled["measured_cpu_s"], scaled["measured_wall_s"]) == (2.0, 900.0, 540.0)
    assert (scaled["cpu_s"], scaled["wall_s"], scaled["extra_cpu_s"]) == (2 * 900 + 2 * 360, 1080.0, 720.0)
    assert scaled["dev_eval_cpu_s"] == 450.0 and runs[("mined", 1)]["time_scale"] == 1.0
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["mined"]["cpu_h"] == pytest.approx((1800 + 360 + 1800 + 720) / 2 / 3600)
    assert rows["mined"]["cpu_h_no_dev"] == pytest.approx((1800 + 360 - 450 + 1800 + 720 - 450) / 2 / 3600)
    assert rows["mined"]["wall_min"] == pytest.approx((1080 + 1080) / 2 / 60)
    header, *lines = result["table"].splitlines()
    at = header.index("time x")
    assert [line[at : at + 6].strip() for line in lines[1:]] == ["1", "1, 2"]  # base, mined
    page = frontier["markdown"](result["methods"], [], "nDCG@10", None)
    assert "| time x |" in page and "| 1, 2 |" in page and "time x: the factors" in page
    again = frontier["main"]([str(out), "--baseline", "base", "--out", str(tmp_path / "again.json")])
    assert _rows_without_provenance(again) == _rows_without_provenance(result)  # its scales and round kept
    plain = frontier["main"]([a, b, *common, "--out", str(tmp_path / "plain.json")])
    assert "time x" not in plain["table"] and "time_scale" not in plain["runs"][0]

    for bad, said in [
        (f"{b}=0", "a positive FACTOR"),
        (f"{b}=fast", "a positive FACTOR"),
        (b, "a positive FACTOR"),
        (f"{tmp_path / 'c'}=2", "is not one of the SPECs given"),
    ]:
        with pytest.raises(SystemExit):
            frontier["main"]([a, b, *common, "--time-scale", bad, "--out", str(tmp_path / "x.json")])
        assert said in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        frontier["main"](
            [str(out), "--baseline", "base", "--time-scale", f"{out}=2", "--out", str(tmp_path / "x.json")]
        )
    assert "on its clock already" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_extra_cost_per_root_charges_each_run_the_round_of_its_own_machine(frontier, tmp_path, capsys):
    """--extra-cost mined@B=FILE2 beside mined=FILE1: the mined run of root B is charged FILE2 (x B's time
    scale), the one of root A FILE1; a root that is not given, or holds no run of the method, is refused
    before anything is written."""
    for root, dirname, cpu in [("a", "base_s1", 3600.0), ("a", "mined_s1", 1800.0), ("b", "mined_s2", 900.0)]:
        ranks = (1, 2, 1, 3, 1, 2) if "mined" in dirname else (2,) * 6
        run = _make_run(tmp_path / root, dirname, 0.70 if "mined" in dirname else 0.66, cpu, 5.0, ranks)
        summary = json.loads((run / "train_summary.json").read_text())
        (run / "train_summary.json").write_text(json.dumps(summary | {"cpu_s": cpu}))
    round_a, round_b = tmp_path / "round_a.tsv", tmp_path / "round_b.tsv"
    round_a.write_text("encode\t300\nmine\t60\n")  # 360 s
    round_b.write_text("encode\t400\nmine\t100\n")  # 500 s, measured on B's clock
    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "f.json"
    argv = [a, b, "--baseline", "base", "--time-scale", f"{b}=2", "--out", str(out)]
    both = ["--extra-cost", f"mined={round_a}", "--extra-cost", f"mined@{b}={round_b}"]
    result = frontier["main"]([*argv, *both])
    runs = {(r["name"], r["seed"]): r for r in result["runs"]}
    assert runs[("mined", 1)]["extra_cpu_s"] == 360.0 and runs[("mined", 1)]["cpu_s"] == 1800.0 + 360.0
    assert runs[("mined", 2)]["extra_cpu_s"] == 2 * 500.0 and runs[("mined", 2)]["cpu_s"] == 2 * 900 + 2 * 500
    assert runs[("base", 1)]["extra_cpu_s"] == 0.0
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["mined"]["extra_cpu_h"] == pytest.approx((360 + 1000) / 2 / 3600)
    assert rows["mined"]["cpu_h"] == pytest.approx((2160 + 2800) / 2 / 3600)
    alone = frontier["main"]([*argv, "--extra-cost", f"mined@{b}={round_b}"])  # root A's run: no round
    assert [r["extra_cpu_s"] for r in alone["runs"] if r["name"] == "mined"] == [0.0, 1000.0]

    for bad, said in [
        (f"mined@{tmp_path / 'c'}={round_b}", "is not one of the SPECs given"),
        (f"mined@={round_b}", "is not one of the SPECs given"),
        (f"base@{b}={round_b}", "holds no finished run of 'base'"),
        (f"minde@{b}={round_b}", "'minde' is not one of the finished methods"),
    ]:
        with pytest.raises(SystemExit):
            frontier["main"]([*argv[:-1], str(tmp_path / "x.json"), "--extra-cost", bad])
        assert said in capsys.readouterr().err, bad
    assert not (tmp_path / "x.json").exists()


def test_probe_clock_scales_each_run_by_its_own_dev_evaluation(frontier, tmp_path, capsys):
    """--probe-clock: eval/clock_check.py's JSON of the same roots puts each run it measured on the reference
    clock by its own probe. By hand: root A (factor 2 given) pools 100 and 110 CPU-s per million dev tokens,
    so the reference rate is 2 x 105 = 210 and A's runs scale by 2.1 and 210/110; root B's run (150 per
    million, factor 1 given: wrong) by 1.4; B's peer (no cost_by_phase) keeps B's factor, and says so."""
    clock_check = load_script("eval/clock_check.py")
    zero = {"cpu_s": 0.0, "wall_s": 0.0, "grad_sequences": 0, "grad_tokens": 0}
    zero |= {"nograd_sequences": 0, "nograd_tokens": 0}
    runs = [
        ("a", "base_s1", 1000.0, 100.0),
        ("a", "mined_s1", 1000.0, 110.0),
        ("b", "mined_s2", 1500.0, 150.0),
    ]
    for root, dirname, cpu, dev in [*runs, ("b", "peer_s1", 700.0, None)]:
        ranks = (1, 2, 1, 3, 1, 2) if "mined" in dirname else (2,) * 6
        run = _make_run(tmp_path / root, dirname, 0.70 if "mined" in dirname else 0.66, cpu, 5.0, ranks)
        summary = json.loads((run / "train_summary.json").read_text()) | {"cpu_s": cpu}
        if dev is not None:
            phases = {phase: dict(zero) for phase in PHASES}
            phases["dev_eval"] |= {"cpu_s": dev, "nograd_sequences": 10, "nograd_tokens": 1_000_000}
            phases["training"] |= {"cpu_s": cpu - dev}
            summary["cost_by_phase"] = phases
        (run / "train_summary.json").write_text(json.dumps(summary))
    a, b, clock = str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "clock.json"
    clock_check.main(["--out", str(clock), f"{a}=2", f"{b}=1"])
    capsys.readouterr()
    argv = [a, b, "--baseline", "base", "--time-scale", f"{a}=2", "--out", str(tmp_path / "f.json")]
    result = frontier["main"]([*argv, "--probe-clock", str(clock)])
    assert f"{tmp_path / 'b' / 'peer_s1'}: no probe in --probe-clock: times x 1" in capsys.readouterr().err
    scaled = {(r["name"], r["seed"]): r for r in result["runs"]}
    assert scaled[("base", 1)]["time_scale"] == 2.1 and scaled[("mined", 1)]["time_scale"] == 1.9091
    assert scaled[("mined", 2)]["time_scale"] == 1.4 and scaled[("peer", 1)]["time_scale"] == 1.0
    assert scaled[("mined", 2)]["cpu_s"] == pytest.approx(2100.0)
    assert scaled[("mined", 2)]["measured_cpu_s"] == 1500.0 and result["probe_clock"] == str(clock)
    page = frontier["markdown"](result["methods"], [], "nDCG@10", None, probe_clock=True)
    assert "Each run's factor is its own dev evaluation's probe (--probe-clock)" in page
    assert "own dev evaluation" not in frontier["markdown"](result["methods"], [], "nDCG@10", None)
    rows = {r["name"]: r for r in result["methods"]}
    assert rows["mined"]["cpu_h"] == pytest.approx((1909.1 + 2100.0) / 2 / 3600)
    assert rows["base"]["cpu_h"] == pytest.approx(2100.0 / 3600) and rows["peer"]["cpu_h"] == 700.0 / 3600
    given = {r["name"]: r for r in frontier["main"](argv)["methods"]}  # without: A x 2, B x 1
    assert given["mined"]["cpu_h"] == pytest.approx((2000.0 + 1500.0) / 2 / 3600)

    (tmp_path / "not_clock.json").write_text(json.dumps({"clocks": [{"runs": [{"run_dir": a}]}]}))
    for bad in (tmp_path / "f.json", tmp_path / "not_clock.json"):  # a frontier's JSON; no implied_factor
        with pytest.raises(SystemExit):
            frontier["main"]([*argv[:-1], str(tmp_path / "x.json"), "--probe-clock", str(bad)])
        err = capsys.readouterr().err
        assert str(bad) in err and "not a JSON of eval/clock_check.py" in err, bad
    with pytest.raises(SystemExit):  # a frontier JSON's runs alone: nothing the clock could rescale
        only_json = [str(tmp_path / "f.json"), "--baseline", "base", "--out", str(tmp_path / "x.json")]
        frontier["main"]([*only_json, "--probe-clock", str(clock)])
    assert f"{clock}: --probe-clock: measured none of the runs read from run dirs" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_frontier_json_keeps_per_query_scores_against_hand_computed_ndcg(frontier, tmp_path):
    ranks = (1, 2, 3, 4, 1, 2)
    _make_run(tmp_path, "base_s1", 0.6, 600.0, 5.0, ranks=ranks)
    result = frontier["main"]([str(tmp_path), "--baseline", "base", "--out", str(tmp_path / "f.json")])
    (run,) = result["runs"]
    want = {q: 1 / math.log2(rank + 1) for q, rank in zip(QUERIES, ranks, strict=True)}
    assert run["per_query"]["nDCG@10"] == pytest.approx(want)


def _rows_without_provenance(result: dict) -> tuple:
    strip = ("run_dir", "test_report")
    runs = [{k: v for k, v in r.items() if k not in strip} for r in result["runs"]]
    return result["methods"], result["paired"], runs, result["table"], result["paired_table"]


def test_a_frontier_rebuilt_from_its_json_is_the_same_and_new_runs_join_it(frontier, tmp_path, capsys):
    """The run dirs gone, frontier.json alone gives the same table, paired tests and per-run records (the
    mining round's cost kept from the JSON, not added twice: giving it again is refused); a new method's runs
    join the kept ones, a run given twice and a JSON without per-query scores are refused."""
    root = scifact_like(tmp_path / "runs")
    for sub in root.glob("mined_b32_s*"):  # CPU times, so that --extra-cost shows in the table
        summary = json.loads((sub / "train_summary.json").read_text())
        (sub / "train_summary.json").write_text(json.dumps(summary | {"cpu_s": 3000.0}))
    cost = tmp_path / "mining_cpu.tsv"
    cost.write_text("encode\t360\n")
    common = ["--baseline", "inbatch_b32", "--pair", "cache_b16=cache_b32"]
    mining = ["--extra-cost", f"mined_b32={cost}"]
    first = frontier["main"]([str(root), *common, *mining, "--out", str(tmp_path / "first.json")])
    assert {r["extra_cpu_s"] for r in first["runs"] if r["name"] == "mined_b32"} == {360.0}
    rebuilt = frontier["main"]([str(tmp_path / "first.json"), *common, "--out", str(tmp_path / "again.json")])
    assert _rows_without_provenance(rebuilt) == _rows_without_provenance(first)
    with pytest.raises(SystemExit):  # counted twice otherwise
        frontier["main"]([str(tmp_path / "first.json"), *common, *mining, "--out", str(tmp_path / "x.json")])
    assert "keep the extra cost they were recorded with" in capsys.readouterr().err
    assert [r["run_dir"] for r in rebuilt["runs"]] == [
        r["run_dir"] for r in first["runs"]
    ]  # where it came from

    new = tmp_path / "new"
    _make_run(new, "cache_b32_lr8e-5_s42", 0.73, 2000.0, 9.0, ranks=(1, 1, 1, 2, 1, 1))
    both = frontier["main"](
        [str(tmp_path / "first.json"), str(new), *common, "--out", str(tmp_path / "b.json")]
    )
    assert len(both["runs"]) == len(first["runs"]) + 1
    row = {r["name"]: r for r in both["paired"] if r["vs"] == "inbatch_b32"}["cache_b32_lr8e-5"]
    base = [
        statistics.fmean(r["per_query"]["nDCG@10"][q] for r in first["runs"] if r["name"] == "inbatch_b32")
        for q in QUERIES
    ]
    mine = [1.0, 1.0, 1.0, 1 / math.log2(3), 1.0, 1.0]
    assert row["mean diff"] == pytest.approx(statistics.fmean(m - b for m, b in zip(mine, base, strict=True)))

    with pytest.raises(SystemExit):  # the same runs twice: from the JSON and from their dirs
        frontier["main"](
            [str(tmp_path / "first.json"), str(root), *common, "--out", str(tmp_path / "x.json")]
        )
    assert "seed 42 is given twice" in capsys.readouterr().err
    old = json.loads((tmp_path / "first.json").read_text())
    for run in old["runs"]:
        del run["per_query"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit):
        frontier["main"]([str(tmp_path / "old.json"), *common, "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert str(tmp_path / "old.json") in err and "run 0 keeps no per-query nDCG@10" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", ["frontier_scifact_cpu", "frontier_scifact_lr8e-5_cpu"])
def test_published_frontier_is_the_one_the_docs_show(name):
    """docs/results.md shows each published frontier JSON's tables verbatim and the README each method's test
    mean: a rerun of the frontier that is not copied into both fails here."""
    root = Path(__file__).resolve().parents[1]
    published = json.loads((root / f"bench/results/{name}.json").read_text())
    results_md, readme = (root / "docs/results.md").read_text(), (root / "README.md").read_text()
    assert published["table"] in results_md and published["paired_table"] in results_md
    for row in published["methods"]:
        assert f"{row['nDCG@10']:.4f}" in readme, row["name"]
    assert (root / f"docs/figures/{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["frontier_scifact_cpu", "frontier_scifact_lr8e-5_cpu"])
def test_no_label_of_a_published_frontier_covers_another(frontier, name, tmp_path, monkeypatch):
    """Every method's name stays readable in both panels of each published plot: where every offset clashes
    with something, the placer still never puts one name over another (14 crowded points at 8e-5 did)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.text import Text

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_frontier closes, to measure it
    root = Path(__file__).resolve().parents[1]
    published = json.loads((root / f"bench/results/{name}.json").read_text())
    rows = published["methods"]
    assert frontier["plot_frontier"](
        rows, published["measure"], published["zero_shot"]["measures"]["nDCG@10"], tmp_path / "f.png"
    )
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text() != "zero-shot"]
        assert sorted(t.get_text() for t in labels) == sorted(r["name"] for r in rows)
        boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in labels]  # texts, not leaders
        covered = [
            (a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :] if box.overlaps(other)
        ]
        assert covered == [], ax.get_title()
    close(fig)


def test_the_time_label_names_every_cost_before_training_on_lines_that_fit_under_a_panel(frontier):
    """Three mined methods' rounds made one 160-character line that ran off the published figure."""
    names = ["mined_b32_lr8e-5", "mined_cache_b32_lr8e-5", "mined_b32_5ep_lr8e-5"]
    rows = [{"name": "base", "time_is": "cpu", "extra_cpu_h": 0.0}]
    rows += [{"name": n, "time_is": "cpu", "extra_cpu_h": 0.1 + i / 100} for i, n in enumerate(names)]
    label = frontier["time_axis_label"](rows)
    lines = label.splitlines()
    assert lines[0].startswith("training CPU time") and lines[1].startswith("included: ")
    assert max(len(line) for line in lines) <= frontier["LABEL_WIDTH"] == 85
    joined = " ".join(lines[1:])
    for i, name in enumerate(names):
        assert joined.count(f"{name} +{0.1 + i / 100:.3f} h before training") == 1
    assert "base" not in joined
    wall = [dict(r, time_is="wall") for r in rows]  # wall time does not include the rounds' CPU time
    assert frontier["time_axis_label"](wall) == "training wall time (hours, dev evaluation included)"
