"""Compare training runs: test measures, best dev score, wall time, memory, and training curves.

    python eval/compare_training.py --zero-shot outputs/scifact_compare/zeroshot.json \\
        --out outputs/scifact_compare/compare.json --plot outputs/scifact_compare/compare.png \\
        inbatch=outputs/scifact_compare/inbatch_s42 cache=outputs/scifact_compare/cache_s42 ...

Each ``NAME=RUN_DIR`` is a ``recipes/train.py`` output directory holding ``train_log.jsonl``,
``train_summary.json`` and ``test.json`` (the eval script's report on its best model; ``--test-report``
names another file). Runs sharing a NAME (several seeds) are also summarised as mean ± sample std. Prints a
table per run, one per name, and paired significance tests of each name against a baseline on the test
queries (per-query scores averaged over seeds; randomization test and paired t-test). Writes JSON and a PNG:
training loss, dev measure and, for cache runs, the staleness of the refreshed table slots, against the
optimizer step. Where the eval report's work dir still holds the corpus embeddings, "doc mean cos" is their
mean pairwise cosine (how crowded the trained model's document space is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from compare_plot import plot_curves
from compare_stats import mean_pairwise_cosine, paired_randomization_pvalue

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.input_files import existing_file, iter_lines, read_json
from dualenc.io.provenance import environment_info
from dualenc.io.text_table import format_table

STALENESS = "cache/staleness_refresh"  # ||e_cached - e_fresh||^2 / ||e_fresh||^2 of the refreshed slots


def read_log(path: Path) -> list[dict]:
    """The records of a ``train_log.jsonl``, in file order."""
    records = []
    for line_no, line in iter_lines(existing_file(path)):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"invalid JSON: {err.msg}", path=path, line=line_no) from None
    return records


def summarise_run(name: str, run_dir: Path, test_report: str) -> dict:
    """One run's numbers: test measures of its best model, best dev score, time, memory, curves."""
    summary = read_json(run_dir / "train_summary.json")
    test = read_json(run_dir / test_report)
    refuse_another_runs_report(run_dir, test, run_dir / test_report)
    log = read_log(run_dir / "train_log.jsonl")
    measure = summary["eval_measure"]
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    dev = [(r["step"], r[f"dev/{measure}"]) for r in log if f"dev/{measure}" in r]
    stale = [(r["step"], r[STALENESS]) for r in log if STALENESS in r]
    step_times = [r["step_time_s"] for r in log if "step_time_s" in r]
    return {
        "name": name,
        "run_dir": str(run_dir),
        "test_report": str(run_dir / test_report),
        "test": test["measures"],
        "test_commit": test.get("commit"),
        "eval_measure": measure,
        "best_dev": summary["best_metric"],
        "best_step": summary["best_step"],
        "steps": summary["steps"],
        "wall_s": run_wall_s(summary, run_dir),
        "peak_rss_gib": summary.get("peak_rss_gib"),
        "peak_mem_gib": summary.get("peak_mem_gib"),
        "median_step_s": statistics.median(step_times) if step_times else None,
        "doc_mean_cos": corpus_mean_cosine(test),
        "curves": {"loss": losses, "dev": dev, "staleness": stale},
    }


def refuse_another_runs_report(run_dir: Path, report: dict, path: Path) -> None:
    """Refuse a test report (``path``) whose scored model (``config.model``) or run file (``run_file``) lies
    outside ``run_dir``: a report copied or left over from another run, which would put one model's scores
    under another's name. Inside: within ``run_dir`` where the path exists from here, else (a model deleted or
    a tree moved since) under a folder of ``run_dir``'s name."""
    config = report.get("config")
    for key, value in (
        ("config.model", config.get("model") if isinstance(config, dict) else None),
        ("run_file", report.get("run_file")),
    ):
        if not isinstance(value, str) or not value:
            problem = f"names no {key}: which model's scores it holds is unknown"
            raise InputError(problem, path=path)
        named = Path(value)
        if named.exists():
            inside = run_dir.resolve() in named.resolve().parents
        else:
            inside = run_dir.name in named.parts[:-1]
        if not inside:
            problem = f"its {key} {value!r} is not inside the run dir: a report of another run's model"
            raise InputError(problem, path=path)


def run_wall_s(summary: dict, run_dir: Path) -> float | None:
    """The run's training wall time, or None when unknown: a resumed run whose summary predates
    ``session_wall_s`` holds the last session's time only."""
    if summary.get("resumed_from") and "session_wall_s" not in summary:
        print(
            f"{run_dir}: resumed, and its train_summary.json holds the last session's wall time only: "
            "left out of the wall-time figures",
            file=sys.stderr,
        )
        return None
    return summary["wall_s"]


def corpus_mean_cosine(report: dict) -> float | None:
    """Mean pairwise cosine of the corpus embeddings an eval report left in ``<work_dir>/corpus``, if any."""
    from dualenc.io.embeddings import load_embeddings

    work_dir = report.get("config", {}).get("work_dir")
    if not work_dir or not (Path(work_dir) / "corpus" / "meta.json").is_file():
        return None
    return mean_pairwise_cosine(*(shard.emb for shard in load_embeddings(Path(work_dir) / "corpus")))


def per_query_scores(report_path: str, measure: str) -> dict[str, float]:
    """Per-query ``measure`` of the run an eval report points at, scored against the report's qrels."""
    from dualenc.evaluation.measures import evaluate_per_query
    from dualenc.io.qrels import read_qrels
    from dualenc.io.runs import read_run

    report = read_json(Path(report_path))
    if "run_file" not in report or "qrels" not in report.get("config", {}):
        raise InputError(
            "not an eval report (no run_file / config.qrels): per-query scores need them", path=report_path
        )
    qrels, run = read_qrels(report["config"]["qrels"]), read_run(report["run_file"])
    return {qid: values[measure] for qid, values in evaluate_per_query(qrels, run, [measure]).items()}


def run_query_scores(run: dict, measure: str) -> dict[str, float]:
    """A run record's per-query ``measure``: kept in the record (``per_query``), else from its test report."""
    kept = run.get("per_query", {}).get(measure)
    return kept if kept is not None else per_query_scores(run["test_report"], measure)


def paired_comparison(runs: list[dict], baseline: str, measure: str) -> list[dict]:
    """Each name against ``baseline`` on the test queries: per-query scores averaged over seeds, mean
    difference, queries better / worse, randomization-test and paired t-test p-values. A run's per-query
    scores are its record's ``per_query[measure]`` when it holds them, else scored from its test report."""
    from scipy import stats

    per_name: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        seeds = [run_query_scores(r, measure) for r in runs if r["name"] == name]
        if any(s.keys() != seeds[0].keys() for s in seeds):
            raise InputError(f"the runs of {name!r} were scored on different queries")
        per_name[name] = {q: statistics.fmean(s[q] for s in seeds) for q in seeds[0]}
    if baseline not in per_name:
        raise InputError(f"baseline {baseline!r} is not one of the runs' names {sorted(per_name)}")
    queries = sorted(per_name[baseline])
    base = np.array([per_name[baseline][q] for q in queries])  # (Q,)
    rows = []
    for name, scores in per_name.items():
        if name == baseline:
            continue
        if scores.keys() != per_name[baseline].keys():
            raise InputError(f"{name!r} and {baseline!r} were scored on different queries")
        other = np.array([scores[q] for q in queries])  # (Q,)
        rows.append(
            {
                "name": name,
                "vs": baseline,
                "measure": measure,
                "queries": len(queries),
                "mean diff": float((other - base).mean()),
                "better": int((other > base).sum()),
                "worse": int((other < base).sum()),
                "p randomization": paired_randomization_pvalue(other, base),
                "p paired t": float(stats.ttest_rel(other, base).pvalue),
            }
        )
    return rows


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: list[dict], measures: Sequence[str]) -> list[dict]:
    """Mean and sample std of the test measures per name (seeds), with mean time and memory."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        group = [r for r in runs if r["name"] == name]
        row: dict = {"name": name, "seeds": len(group)}
        for m in measures:
            mean, std = _mean_std([r["test"][m] for r in group])
            row[m], row[f"{m} std"] = mean, std
        walls = [r["wall_s"] for r in group if r["wall_s"] is not None]
        row["wall_s"] = statistics.fmean(walls) if walls else None
        rss = [r["peak_rss_gib"] for r in group if r["peak_rss_gib"] is not None]
        row["peak_rss_gib"] = max(rss) if rss else None
        cosines = [r["doc_mean_cos"] for r in group if r["doc_mean_cos"] is not None]
        row["doc_mean_cos"] = statistics.fmean(cosines) if cosines else None
        rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR (repeat a NAME for several seeds)")
    p.add_argument("--zero-shot", default=None, help="eval report of the model before training (a row)")
    p.add_argument(
        "--zero-shot-dev", default=None, help="eval report of that model on the dev set (plot line)"
    )
    p.add_argument("--test-report", default="test.json", help="eval report inside each run dir")
    p.add_argument("--out", required=True, type=Path, help="JSON output")
    p.add_argument("--plot", default=None, type=Path, help="PNG of the training curves")
    p.add_argument("--baseline", default=None, help="NAME the others are tested against (default: the first)")
    p.add_argument("--no-tests", action="store_true", help="skip the paired significance tests")
    return p.parse_args(argv)


def _fail(err: InputError) -> SystemExit:
    print(f"compare_training: error: {err}", file=sys.stderr)
    return SystemExit(2)


def read_runs(specs: Sequence[str], test_report: str) -> list[dict]:
    """:func:`summarise_run` of each ``NAME=RUN_DIR``."""
    runs = []
    for spec in specs:
        name, sep, run_dir = spec.partition("=")
        if not sep or not name or not run_dir:
            raise InputError(f"expected NAME=RUN_DIR, got {spec!r}")
        runs.append(summarise_run(name, Path(run_dir), test_report))
    return runs


def per_run_rows(runs: list[dict], zero: dict | None, zero_cos: float | None) -> list[dict]:
    """One table row per run, under a zero-shot row when there is a zero-shot report."""
    measures, dev_measure = list(runs[0]["test"]), runs[0]["eval_measure"]
    rows = [
        {
            "run": Path(r["run_dir"]).name,
            **{f"test {m}": r["test"][m] for m in measures},
            f"best dev {dev_measure}": r["best_dev"],
            "best step": r["best_step"],
            "steps": r["steps"],
            "wall s": r["wall_s"],
            "median step s": r["median_step_s"],
            "peak RSS GiB": r["peak_rss_gib"],
            "doc mean cos": r["doc_mean_cos"],
        }
        for r in runs
    ]
    if zero is None:
        return rows
    zero_row = {"run": "zero-shot", **{f"test {m}": zero["measures"][m] for m in measures}}
    return [zero_row | {"doc mean cos": zero_cos}, *rows]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        runs = read_runs(args.runs, args.test_report)
        zero = read_json(Path(args.zero_shot)) if args.zero_shot else None
        zero_dev_report = read_json(Path(args.zero_shot_dev)) if args.zero_shot_dev else None
    except InputError as err:
        raise _fail(err) from err
    measures, dev_measure = list(runs[0]["test"]), runs[0]["eval_measure"]
    zero_dev = None if zero_dev_report is None else zero_dev_report["measures"][dev_measure]
    zero_cos = None if zero is None else corpus_mean_cosine(zero)
    table = format_table(per_run_rows(runs, zero, zero_cos))
    by_name = aggregate(runs, measures)
    name_table = format_table(by_name)
    paired = []
    if not args.no_tests and len({r["name"] for r in runs}) > 1:
        try:
            paired = paired_comparison(runs, args.baseline or runs[0]["name"], measures[0])
        except InputError as err:
            raise _fail(err) from err
        except ImportError:
            print("scipy is not installed: no significance tests (pip install scipy)", file=sys.stderr)
    paired_table = format_table(paired)
    print(table, "\n", name_table, "\n", paired_table, sep="\n")
    zero_shot = None
    if zero is not None:
        zero_shot = {"measures": zero["measures"], "commit": zero.get("commit"), "doc_mean_cos": zero_cos}
    result = {
        "runs": runs,
        "by_name": by_name,
        "zero_shot": zero_shot,
        "table": table,
        "name_table": name_table,
        "paired": paired,
        "paired_table": paired_table,
        **environment_info(Path(__file__).parent),
    }
    atomic.write_json(args.out, result)
    if args.plot is not None and plot_curves(runs, zero_dev, args.plot, dev_measure):
        print(f"plot: {args.plot}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
