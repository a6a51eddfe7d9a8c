"""Quality against cost of SciFact training runs: one table, one picture with the Pareto fronts, paired tests.

    python eval/frontier.py --zero-shot OUT/zeroshot.json --baseline inbatch_b32 --out OUT/frontier.json \\
        --plot OUT/frontier.png --markdown OUT/frontier.md OUT    # OUT=outputs/frontier

SPEC: ``NAME=RUN_DIR`` (as in eval/compare_training.py), a ROOT whose ``<name>_s<seed>`` subdirectories
holding ``train_summary.json`` and ``test.json`` are runs of method ``<name>`` (others so named: unfinished;
a run whose ``test.json`` scored a model or run file outside its dir, as a copied folder's does: refused),
or a frontier JSON this script wrote (``--out``): its runs as they were recorded, with the per-query scores it
keeps of each, so that a table outlives its run dirs and new runs can join it.
Per method over seeds: test measure (mean ± sample std), R@100, training time, max peak RSS, gain over
zero-shot per hour of training time and per GiB, and whether it is on the Pareto front against time, and
against memory: no other method has a mean as high or higher at a cost as low or lower, one strictly. Training
time is CPU time (``cpu_s`` of train_summary.json: user + system of every thread of the training process, dev
evaluation included), which other jobs on the machine do not inflate, where every run recorded it; else wall
time. Where every run of a method recorded ``cost_by_phase``, the table adds its CPU hours less dev
evaluation (which the protocol, not the method, sizes: an evaluation every so many steps). Zero-shot (cost 0)
is a reference line, not a method of the fronts (a method below it can be on one); a method without a time is
on no time front. Paired tests of each method against ``--baseline`` on the test queries (per-query scores
averaged over seeds; randomization, paired t), and ``--pair METHOD=CONTROL`` adds the test of METHOD against
a control of the same cost shape (the cache at batch 16 against in-batch at batch 16: the same step count,
without the cache).

``--extra-cost METHOD=FILE`` adds work done before training to each run of METHOD's CPU time: FILE has lines
``STEP<TAB>CPU_SECONDS`` (recipes/hard_negative_round.sh writes such a ``mining_cpu.tsv``).
``--extra-cost METHOD@SPEC=FILE`` does so for the runs of METHOD read from SPEC alone (the round mined on that
run's machine), in place of a ``METHOD=FILE`` given too. The runs of a frontier JSON keep the extra cost they
were recorded with (``extra_cpu_s``): ``--extra-cost`` applies to runs read from run dirs.

``--time-scale SPEC=FACTOR`` puts runs measured on another machine on the clock of the others: each run of
SPEC (one of the SPECs given) has its wall time, CPU time (extra cost included) and dev-evaluation time
multiplied by FACTOR, e.g. the ratio of one method's CPU time measured on both machines; the JSON keeps each
run's ``time_scale`` and its measured ``measured_wall_s`` and ``measured_cpu_s``, the table a "time x" column.
``--probe-clock CLOCK_JSON`` (eval/clock_check.py's ``--out``) scales instead each run of a run dir that JSON
measured by that run's own factor: its dev evaluation as a probe of the machine's speed during the run
(``implied_factor``, to 4 decimals); the runs it did not measure (no ``cost_by_phase``) keep their SPEC's,
and one that measured none of the runs read from run dirs is refused.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from compare_training import (
    aggregate,
    paired_comparison,
    per_query_scores,
    refuse_another_runs_report,
    run_wall_s,
    summarise_run,
)

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.input_files import existing_file, iter_lines, read_json
from dualenc.io.provenance import environment_info
from dualenc.io.text_table import format_table

TEST = "test.json"
RUN_FILES = ("train_summary.json", TEST)
RUN_NAME = re.compile(r"(?P<name>.+)_s(?P<seed>\d+)")
RECALL = "R@100"
TIMES = ("wall_s", "cpu_s", "dev_eval_cpu_s")  # what --time-scale multiplies
COSTS = {"time": "time_h", "memory": "peak_rss_gib"}  # front -> cost key of a method row
LABEL_WIDTH = 85  # characters an axis label line may hold under one panel of the figure
NO_DEV = "CPU h excl. dev"  # a column shown when some method has it (every run recorded cost_by_phase)
CELLS = [("wall min", "wall_min", 1), ("CPU h", "cpu_h", 3), (NO_DEV, "cpu_h_no_dev", 3)]
CELLS += [("peak GiB", "peak_rss_gib", 2)]
CELLS += [("gain/CPU-h", "gain_per_cpu_hour", 4)]
CELLS = [(RECALL, RECALL, 4), *CELLS, ("gain/GiB", "gain_per_gib", 4)]  # (header, row key, decimals)
NEAR = [(7, 4), (7, -4), (-7, 4), (-7, -4), (0, 12), (0, -12)]  # label offsets (points); then with a leader:
FAR = [(20, 18), (35, 6), (0, 30), (30, 32), (0, 48), (45, 45), (60, 24), (20, 64), (64, 64)]
LABEL_OFFSETS = NEAR + [(sx * x, sy * y) for x, y in FAR for sy in (1, -1) for sx in (1, -1)]
LEADER = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "grey"}}
LABEL = {"textcoords": "offset points", "fontsize": 8, "zorder": 4}
POINT = {"fmt": "o", "capsize": 3, "zorder": 3}
ON_FRONT, DOMINATED = {"ms": 9, "mec": "black", "mew": 1.2}, {"ms": 7, "mfc": "white", "mew": 1.8}


def pareto_front(points: dict[str, tuple[float, float | None]]) -> list[str]:
    """The names of ``{name: (quality, cost)}`` no other point dominates (quality as high or higher, cost as
    low or lower, one strictly), in input order; equal points are all on it, a point without cost on none."""
    costed = {name: qc for name, qc in points.items() if qc[1] is not None}

    def dominated(q: float, c: float) -> bool:
        return any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for q2, c2 in costed.values())

    return [name for name, (q, c) in costed.items() if not dominated(q, c)]


def discover(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The runs ``(method, dir)`` under ``root`` by method and seed; the unfinished dirs (told on stderr)."""
    if not root.is_dir():
        raise InputError("expected NAME=RUN_DIR or a directory of <name>_s<seed> runs", path=root)
    found, unfinished = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match, finished = RUN_NAME.fullmatch(sub.name), all((sub / f).is_file() for f in RUN_FILES)
        if match and finished:
            found.append((match["name"], int(match["seed"]), sub))
        elif match:
            unfinished.append(str(sub))
            print(f"{sub}: not finished, left out (no {' or '.join(RUN_FILES)})", file=sys.stderr)
        elif finished:
            print(f"{sub}: holds a run but is not named <name>_s<seed>: left out", file=sys.stderr)
    return [(name, sub) for name, _, sub in sorted(found, key=lambda f: f[:2])], unfinished


def summarise(name: str, run_dir: Path, measure: str) -> dict:
    """compare_training's record of one run, with its seed (the ``_s<seed>`` of the dir's name, else None); a
    run without a training log (no curves) is read from its two JSON files alone."""
    try:
        if (run_dir / "train_log.jsonl").is_file():
            record = summarise_run(name, run_dir, TEST)  # refuses another run's report
        else:
            summary, test = read_json(run_dir / "train_summary.json"), read_json(run_dir / TEST)
            refuse_another_runs_report(run_dir, test, run_dir / TEST)
            record = dict(name=name, run_dir=str(run_dir), test_report=str(run_dir / TEST), doc_mean_cos=None)
            record |= {"test": test["measures"], "wall_s": run_wall_s(summary, run_dir)}
            record |= {"peak_rss_gib": summary.get("peak_rss_gib"), "best_dev": summary.get("best_metric")}
    except KeyError as err:
        raise InputError(f"train_summary.json or {TEST} lacks the key {err}", path=run_dir) from None
    if measure not in record["test"]:
        raise InputError(f"no {measure} among the measures {sorted(record['test'])}", path=run_dir / TEST)
    summary = read_json(run_dir / "train_summary.json")
    record["cpu_s"] = summary.get("cpu_s")  # None: made before it was kept
    record["dev_eval_cpu_s"] = dev_eval_cpu_s(summary, run_dir)
    return record | {"seed": int(m["seed"]) if (m := RUN_NAME.fullmatch(run_dir.name)) else None}


def dev_eval_cpu_s(summary: dict, run_dir: Path) -> float | None:
    """The CPU seconds of a run's dev evaluations (``cost_by_phase``: dualenc.training.cost_meter), None for a
    run made before train_summary.json recorded them."""
    phases = summary.get("cost_by_phase")
    if phases is None:
        return None
    try:
        return float(phases["dev_eval"]["cpu_s"])
    except (KeyError, TypeError, ValueError):
        problem = f"cost_by_phase has no dev_eval cpu_s number: {phases!r:.80}"
        raise InputError(problem, path=run_dir / "train_summary.json") from None


def method_spec(flag: str, spec: str, value: str, methods: Sequence[str]) -> tuple[str, str]:
    """``METHOD=VALUE`` of ``flag`` as (METHOD, VALUE), METHOD one of the finished ``methods``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"{flag}: expected METHOD={value}, got {spec!r}")
    if name not in methods:
        raise InputError(f"{flag}: {name!r} is not one of the finished methods {list(methods)}")
    return name, rest


def read_extra_costs(
    specs: Sequence[str], methods: Sequence[str], given: Sequence[str]
) -> dict[tuple[str, str | None], float]:
    """``METHOD=FILE`` -> (METHOD, None) and ``METHOD@SPEC=FILE`` (SPEC one of the ``given`` specs) ->
    (METHOD, SPEC): the CPU seconds of FILE's ``STEP<TAB>CPU_SECONDS`` lines, summed (over repeats too)."""
    extra: dict[tuple[str, str | None], float] = {}
    for spec in specs:
        target, sep, path = spec.partition("=")
        method, at, root = target.partition("@")
        if at and (not root or root not in given):
            raise InputError(f"--extra-cost {spec!r}: {root!r} is not one of the SPECs given {list(given)}")
        name, path = method_spec("--extra-cost", f"{method}{sep}{path}", "FILE", methods)
        total = 0.0
        for number, line in iter_lines(existing_file(path)):
            step, _, seconds = line.partition("\t")
            try:
                total += float(seconds)
            except ValueError:
                problem = f"expected STEP<TAB>CPU_SECONDS, got {line!r}"
                raise InputError(problem, path=path, line=number) from None
        key = (name, root if at else None)
        extra[key] = extra.get(key, 0.0) + total
    return extra


def add_extra_costs(runs: list[dict], extra: dict[tuple[str, str | None], float]) -> None:
    """Each run of a method in ``extra`` costs that much more CPU time (``extra_cpu_s`` says how much): the
    cost given for its method and SPEC, else for its method; on the run's clock (x its ``time_scale``: the
    work was measured on the run's machine). A frontier JSON's runs keep theirs; a cost that would apply to no
    run read from a run dir is refused."""
    for method, spec in extra:
        if not any(r["name"] == method and spec in (None, r["spec"]) and not r["from_json"] for r in runs):
            where = "any run dir given" if spec is None else repr(spec)
            problem = f"{where} holds no finished run of {method!r}"
            kept = " (a frontier JSON's runs keep the extra cost they were recorded with)"
            raise InputError(f"--extra-cost {method}{'' if spec is None else '@' + spec}: {problem}{kept}")
    for run in runs:
        if run["from_json"]:  # its extra_cpu_s is in its cpu_s already
            continue
        seconds = extra.get((run["name"], run["spec"]), extra.get((run["name"], None), 0.0))
        run["extra_cpu_s"] = seconds * run.get("time_scale", 1.0)  # measured beside it
        if run.get("cpu_s") is not None:
            run["cpu_s"] += run["extra_cpu_s"]


def read_time_scales(specs: Sequence[str], given: Sequence[str]) -> dict[str, float]:
    """``SPEC=FACTOR`` of ``--time-scale``: the SPEC (one of the ``given`` specs) and its positive factor."""
    scales: dict[str, float] = {}
    for item in specs:
        spec, sep, value = item.rpartition("=")
        try:
            factor = float(value) if sep else float("nan")
        except ValueError:
            factor = float("nan")
        if not factor > 0 or factor == float("inf"):
            raise InputError(f"--time-scale: expected SPEC=FACTOR with a positive FACTOR, got {item!r}")
        if spec not in given:
            raise InputError(f"--time-scale {item!r}: {spec!r} is not one of the SPECs given {list(given)}")
        if spec in scales:
            raise InputError(f"--time-scale: {spec!r} is given twice")
        scales[spec] = factor
    return scales


def scale_times(runs: list[dict], factor: float) -> list[dict]:
    """``runs`` (just read from their dirs) on another machine's clock: times x ``factor``, measured kept."""
    scaled = []
    for run in runs:
        times = {k: None if run.get(k) is None else run[k] * factor for k in TIMES}
        measured = {"measured_wall_s": run.get("wall_s"), "measured_cpu_s": run.get("cpu_s")}
        scaled.append(run | times | measured | {"time_scale": factor})
    return scaled


def read_probe_clock(path: Path) -> dict[Path, float]:
    """eval/clock_check.py's JSON -> {resolved run dir: the run's own probe factor, to 4 decimals}."""
    report = read_json(path)
    try:
        runs = [run for clock in report["clocks"] for run in clock["runs"]]
        factors = {Path(run["run_dir"]).resolve(): round(float(run["implied_factor"]), 4) for run in runs}
    except (KeyError, TypeError, ValueError):
        problem = "not a JSON of eval/clock_check.py (clocks of runs with run_dir and implied_factor)"
        raise InputError(problem, path=path) from None
    if not factors or not all(0 < f < float("inf") for f in factors.values()):
        raise InputError("no run with a positive implied_factor", path=path)
    return factors


def read_published(path: Path, measure: str) -> list[dict]:
    """The run records of a frontier JSON written earlier, as :func:`summarise` makes them, with their kept
    per-query ``measure``; ``cpu_s`` with the ``--extra-cost`` added then (``extra_cpu_s``), kept."""
    report = read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
        raise InputError("not a frontier JSON of eval/frontier.py (no list of runs)", path=path)
    records = []
    for index, run in enumerate(report["runs"]):
        scores = run.get("per_query", {}).get(measure) if isinstance(run, dict) else None
        if scores is None:
            problem = f"run {index} keeps no per-query {measure} (written before frontier.json kept them, or"
            raise InputError(f"{problem} for another measure): rebuild it from its run dir", path=path)
        try:
            record = {
                key: run[key] for key in ("name", "seed", "run_dir", "wall_s", "peak_rss_gib", "best_dev")
            }
            test = {m: run[m] for m in (measure, RECALL) if run.get(m) is not None}
            cpu_s, extra = run["cpu_s"], run["extra_cpu_s"] or 0.0  # extra: in cpu_s
        except KeyError as err:
            raise InputError(f"run {index} lacks the key {err}", path=path) from None
        record |= {
            "test": test,
            "cpu_s": cpu_s,
            "extra_cpu_s": extra,
            "per_query": {measure: scores},
        }
        record |= {"dev_eval_cpu_s": run.get("dev_eval_cpu_s")}  # absent: written before it was kept
        record |= {k: run.get(k) for k in ("measured_wall_s", "measured_cpu_s")}  # times kept as scaled
        record["time_scale"] = run.get("time_scale", 1.0)
        records.append(record | {"doc_mean_cos": run.get("doc_mean_cos"), "test_report": None})
    return records


def read_specs(
    specs: Sequence[str],
    measure: str,
    scales: dict[str, float] | None = None,
    probes: dict[Path, float] | None = None,
) -> list[dict]:
    """The runs of each ``NAME=RUN_DIR``, each ROOT and each frontier JSON, each with its per-query
    ``measure`` (``per_query``, scored once here), those of a spec in ``scales`` on the others' clock, a run
    dir in ``probes`` by its own factor instead; a run (method and seed) given twice is refused."""
    runs, scales, probes = [], scales or {}, probes or {}
    for spec in specs:
        name, sep, run_dir = spec.partition("=")
        if spec.endswith(".json") and Path(spec).is_file():
            if spec in scales:
                raise InputError(f"--time-scale {spec!r}: a frontier JSON's runs are on its clock already")
            runs += [run | {"spec": spec, "from_json": True} for run in read_published(Path(spec), measure)]
            continue
        if sep and not Path(spec).is_dir():
            if not name or not run_dir:
                raise InputError(f"expected NAME=RUN_DIR, a directory or a frontier JSON, got {spec!r}")
            found = [(name, Path(run_dir))]
        else:
            found = discover(Path(spec))[0]
        for name, sub in found:
            run = summarise(name, sub, measure) | {"spec": spec, "from_json": False}
            run["per_query"] = {measure: per_query_scores(run["test_report"], measure)}
            resolved = Path(run["run_dir"]).resolve()
            factor = probes.get(resolved, scales.get(spec))
            if probes and resolved not in probes:
                print(f"{sub}: no probe in --probe-clock: times x {factor or 1:g}", file=sys.stderr)
            runs += [run | {"time_scale": 1.0}] if factor is None else scale_times([run], factor)
    seen = set()
    for run in runs:
        key = (run["name"], run["seed"])
        if run["seed"] is not None and key in seen:
            raise InputError(
                f"run {run['name']!r} seed {run['seed']} is given twice (latest: {run['run_dir']})"
            )
        seen.add(key)
        if run["wall_s"] is None:
            print(f"{run['run_dir']}: no wall time: kept for quality, not for time", file=sys.stderr)
    return runs


def method_rows(runs: list[dict], measure: str, zero: float | None) -> list[dict]:
    """Per method: quality (mean, sample std), costs, gains over zero-shot per CPU-hour and GiB, fronts.

    Time is the training process's CPU time (``cpu_s``: user + system of all its threads, which other jobs on
    the machine do not inflate) where every run of every method recorded it, else the wall time."""
    measures = [measure] + ([RECALL] if measure != RECALL and all(RECALL in r["test"] for r in runs) else [])
    use_cpu = all(r.get("cpu_s") is not None for r in runs)
    rows = []
    for agg in aggregate(runs, measures):
        mine = [r for r in runs if r["name"] == agg["name"]]
        cpu_h = sum(r["cpu_s"] for r in mine) / len(mine) / 3600 if use_cpu else None
        extra_h = sum(r.get("extra_cpu_s", 0.0) for r in mine) / len(mine) / 3600  # included in cpu_h
        wall_s, gib, gain = agg["wall_s"], agg["peak_rss_gib"], None if zero is None else agg[measure] - zero
        hours = cpu_h if use_cpu else (None if wall_s is None else wall_s / 3600)
        row = {k: agg.get(k) for k in ("name", "seeds", measure, f"{measure} std", RECALL, "wall_s")}
        row |= {"wall_min": None if wall_s is None else wall_s / 60, "cpu_h": cpu_h, "peak_rss_gib": gib}
        row["cpu_h_no_dev"] = cpu_hours_without_dev_eval(mine)
        row["time_scales"] = sorted({r.get("time_scale", 1.0) for r in mine})
        row |= {"time_h": hours, "time_is": "cpu" if use_cpu else "wall", "extra_cpu_h": extra_h}
        row["gain_per_cpu_hour"] = None if gain is None or not hours else gain / hours
        row["gain_per_gib"] = None if gain is None or not gib else gain / gib
        rows.append(row | {"doc_mean_cos": agg["doc_mean_cos"]})
    fronts = {f: pareto_front({r["name"]: (r[measure], r[c]) for r in rows}) for f, c in COSTS.items()}
    return [r | {f"front_{f}": r["name"] in names for f, names in fronts.items()} for r in rows]


def cpu_hours_without_dev_eval(runs: list[dict]) -> float | None:
    """Mean CPU hours of ``runs`` less their dev evaluations, whose share depends on the protocol (how often,
    on how many documents) rather than on the method; None unless every run recorded both."""
    if not all(r.get("cpu_s") is not None and r.get("dev_eval_cpu_s") is not None for r in runs):
        return None
    return sum(r["cpu_s"] - r["dev_eval_cpu_s"] for r in runs) / len(runs) / 3600


def _cells(row: dict, measure: str, show_no_dev: bool = True, show_scale: bool = False) -> dict:
    """A method row as the tables show it (the column of CPU hours less dev evaluation only if
    ``show_no_dev``, that of the time scales of its runs only if ``show_scale``)."""
    std = row[f"{measure} std"]
    cells = {"method": row["name"], "seeds": str(row["seeds"])}
    cells[f"{measure} (mean ± std)"] = f"{row[measure]:.4f}" + ("" if std is None else f" ± {std:.4f}")
    shown = [cell for cell in CELLS if show_no_dev or cell[0] != NO_DEV]
    cells |= {head: "-" if row.get(key) is None else f"{row[key]:.{digits}f}" for head, key, digits in shown}
    if show_scale:
        cells["time x"] = ", ".join(f"{scale:g}" for scale in row["time_scales"])
    return cells | {f"front {front}": "yes" if row[f"front_{front}"] else "" for front in COSTS}


def markdown(
    rows: list[dict], paired: list[dict], measure: str, zero: float | None, probe_clock: bool = False
) -> str:
    """GitHub markdown: the methods table, the zero-shot figure, and the paired tests; ``probe_clock``: the
    time factors are the runs' own probes' (``--probe-clock``)."""
    shown = has_cpu_hours_without_dev_eval(rows), has_time_scales(rows)
    cells = [_cells(r, measure, *shown) for r in rows]
    parts = [_md_table(list(cells[0]), [list(c.values()) for c in cells])]
    if zero is not None:
        clock = "CPU time (cpu_s)" if rows[0]["time_is"] == "cpu" else "wall time"
        parts.append(f"Zero-shot: {measure} {zero:.4f}; gains are over it, per hour of training {clock}.")
    if shown[1]:
        scaled = (
            "time x: the factors its runs' times were multiplied by, to put runs measured on another machine"
        )
        parts.append(scaled + " on the others' clock (1: measured on it).")
        if probe_clock:
            probe = "Each run's factor is its own dev evaluation's probe (--probe-clock), else its root's."
            parts.append(probe)
    for row in rows:
        if row.get("extra_cpu_h") and row["time_is"] == "cpu":
            hours = f"{row['extra_cpu_h']:.3f}"
            parts.append(f"{row['name']}: its CPU h include {hours} h spent before training.")
    if paired:
        keys = [k for k in paired[0] if k != "measure"]
        values = [[f"{p[k]:.4f}" if isinstance(p[k], float) else str(p[k]) for k in keys] for p in paired]
        parts.append(f"Paired tests on test {measure}:\n\n" + _md_table(["method", *keys[1:]], values))
    return "\n\n".join(parts) + "\n"


def has_time_scales(rows: list[dict]) -> bool:
    """Whether some run's times were scaled (``--time-scale``; else the tables leave the column out)."""
    return any(scale != 1.0 for r in rows for scale in r["time_scales"])


def has_cpu_hours_without_dev_eval(rows: list[dict]) -> bool:
    """Whether some method row has CPU hours less dev evaluation (else the tables leave the column out)."""
    return any(r.get("cpu_h_no_dev") is not None for r in rows)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *rows])


def _label_points(ax, points: list[tuple[float, float, float, str]]) -> None:
    """Label each point ``(x, y, y error, name)`` at the first offset where neither the text nor its leader
    line covers a marker, error bar, line or text, nor leaves the frame (else where they cover fewest, a label
    that covers another label counting ten: it hides both names)."""
    import numpy as np
    from matplotlib.transforms import Bbox

    renderer, frame, px = ax.figure.canvas.get_renderer(), ax.get_window_extent(), ax.transData.transform
    taken = [Bbox.from_extents(*(px((x, y - e)) - 6), *(px((x, y + e)) + 6)) for x, y, e, _ in points]
    for line in ax.lines:  # the front's steps, the zero-shot line
        xy = line.get_transform().transform(line.get_path().vertices)  # (n, 2) pixels
        taken += [Bbox(np.sort(xy[i : i + 2], axis=0)).padded(3) for i in range(len(xy) - 1)]
    taken += [t.get_window_extent(renderer) for t in ax.texts]  # the zero-shot label
    labels = []  # the boxes of the labels placed so far: covering one hides both names, worse than any line
    centres = [px((x, y)) for x, y, _, _ in points]  # (pixels) of the markers
    for k, (x, y, _, name) in sorted(enumerate(points), key=lambda kp: (-kp[1][1], kp[1][0])):  # top down
        crossable = [t for j, t in enumerate(taken) if j != k] + labels  # what its leader must not cross
        scored = []
        for offset in LABEL_OFFSETS:
            box = _annotate(ax, name, (x, y), offset, lead=False).get_window_extent(renderer).padded(2)
            ax.texts[-1].remove()
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clash = sum(box.overlaps(t) for t in taken) + 10 * sum(box.overlaps(t) for t in labels)
            clash += 0 if inside else 100
            clash += 3 * _read_as_anothers(box, k, centres, offset not in NEAR)  # worse than crossing a line
            if offset not in NEAR:  # samples of the leader line from the point towards the text
                start = centres[k]
                leader = start + np.linspace(0.15, 0.85, 8)[:, None] * (box.get_points().mean(0) - start)
                clash += sum(any(t.contains(*p) for p in leader) for t in crossable)
            scored.append((clash, len(scored), box))
            if clash == 0:
                break
        _, index, box = min(scored)
        _annotate(ax, name, (x, y), LABEL_OFFSETS[index])
        labels.append(box)


def _read_as_anothers(box, own: int, centres: list, lead: bool) -> int:
    """1 if a label ``box`` would read as another point's (pixel ``centres``): without a leader line, when it
    lies nearer another point than its own; with one, when it ends within 20 pixels of another point."""

    def gap(centre) -> float:
        x, y = centre
        return math.hypot(max(box.x0 - x, 0.0, x - box.x1), max(box.y0 - y, 0.0, y - box.y1))

    limit = 20.0 if lead else gap(centres[own])
    return int(any(gap(c) < limit for j, c in enumerate(centres) if j != own))


def _annotate(ax, name: str, xy: tuple[float, float], offset: tuple[int, int], lead: bool = True):
    """``name`` at ``offset`` points from ``xy``, aligned away from it; a leader line if far and ``lead``."""
    dx, dy = offset
    align = {"ha": "left" if dx > 0 else "right" if dx < 0 else "center", "va": "bottom" if dy > 0 else "top"}
    leader = LEADER if lead and offset not in NEAR else {}
    return ax.annotate(name, xy, xytext=offset, **LABEL, **align, **leader)


def time_axis_label(rows: list[dict], width: int = LABEL_WIDTH) -> str:
    """The time panel's axis label: what the time is, then the work before training it includes, wrapped to
    ``width`` characters a line so that no line runs off the figure however many methods add some."""
    time_is = rows[0]["time_is"]
    label = {
        "cpu": "training CPU time (hours: user + system of every thread, dev evaluation included)",
        "wall": "training wall time (hours, dev evaluation included)",
    }[time_is]
    extra = [f"{r['name']} +{r['extra_cpu_h']:.3f} h before training" for r in rows if r.get("extra_cpu_h")]
    if extra and time_is == "cpu":
        included = "included: " + ", ".join(extra)
        label += "\n" + "\n".join(textwrap.wrap(included, width, break_on_hyphens=False))
    return label


def plot_frontier(rows: list[dict], measure: str, zero: float | None, path: Path) -> bool:
    """PNG at ``path``: quality (± std over seeds) against training time and against peak memory, the Pareto
    fronts as steps, zero-shot as a dashed line, a label per method; False without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors  # a method's colour in both panels
    panels = [("time_h", "time", time_axis_label(rows))]
    panels.append(("peak_rss_gib", "memory", "peak memory of training (RSS, GiB)"))
    placed = []
    for ax, (cost, front, xlabel) in zip(axes, panels, strict=True):
        shown = [(i, r) for i, r in enumerate(rows) if r[cost] is not None]
        points = [(r[cost], r[measure], r[f"{measure} std"] or 0.0, r["name"]) for _, r in shown]
        for (i, r), (x, y, err, _) in zip(shown, points, strict=True):
            style = ON_FRONT if r[f"front_{front}"] else DOMINATED
            ax.errorbar(x, y, yerr=err or None, color=colours[i % len(colours)], **POINT, **style)
        steps = sorted((p[:2] for (_, r), p in zip(shown, points, strict=True) if r[f"front_{front}"]))
        if steps:  # the best quality at each cost, drawn to the costliest point
            xs = [p[0] for p in steps] + [max(p[0] for p in points)]
            xs = [xs[0]] + [x for x in xs[1:-1] for _ in (0, 1)] + [xs[-1]]  # the corners of the steps
            ys = [p[1] for p in steps for _ in (0, 1)]
            ax.plot(xs, ys, color="black", lw=1.2, alpha=0.6, label="Pareto front")
        if zero is not None:
            ax.axhline(zero, ls="--", color="grey", lw=1.2, label="zero-shot (no training)")
            where = {"xycoords": ("axes fraction", "data"), "ha": "right", "va": "bottom"}
            ax.annotate("zero-shot", (0.99, zero), xytext=(0, 3), **where, **LABEL | {"fontsize": 9})
        ax.margins(0.12, 0.12)  # room for the labels, and limits fixed before they are placed:
        ax.autoscale_view()
        missing = [r["name"] for r in rows if r[cost] is None]
        ax.set_title(f"against {front}" + (f" (no cost, not shown: {', '.join(missing)})" if missing else ""))
        ax.set(xlabel=xlabel, ylabel=f"test {measure} (mean ± std over seeds)")
        ax.grid(True, alpha=0.3)
        placed.append(points)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], ls="", marker="o", color="grey", **kind) for kind in (ON_FRONT, DOMINATED)]
    fig.legend(handles, [*labels, "on the front", "dominated"], loc="lower center", ncol=4, fontsize=9)
    fig.suptitle(f"SciFact test {measure} against training cost: one point per method, Pareto fronts")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    for ax, points in zip(axes, placed, strict=True):  # once the layout is final
        _label_points(ax, points)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", metavar="SPEC", help="NAME=RUN_DIR, or a ROOT of <name>_s<seed> runs")
    p.add_argument("--zero-shot", default=None, type=Path, help="eval report of the model before training")
    p.add_argument("--baseline", required=True, help="method the others are tested against")
    p.add_argument("--measure", default="nDCG@10", help="quality measure of the test reports")
    p.add_argument("--out", required=True, type=Path, help="JSON output")
    p.add_argument("--plot", default=None, type=Path, help="PNG: quality against wall time and memory")
    p.add_argument("--markdown", default=None, type=Path, help="GitHub markdown tables")
    p.add_argument(
        "--extra-cost",
        action="append",
        default=[],
        metavar="METHOD[@SPEC]=FILE",
        help="CPU seconds spent before training (STEP<TAB>CPU_SECONDS lines) added to each run of METHOD "
        "(read from SPEC: only those, in place of METHOD=FILE); repeatable",
    )
    p.add_argument(
        "--time-scale",
        action="append",
        default=[],
        metavar="SPEC=FACTOR",
        help="multiply the times of SPEC's runs (measured on another machine) by FACTOR; repeatable",
    )
    p.add_argument(
        "--probe-clock",
        default=None,
        type=Path,
        metavar="CLOCK_JSON",
        help="eval/clock_check.py's JSON: scale each run it measured by its own probe factor instead",
    )
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="METHOD=CONTROL",
        help="also test METHOD against CONTROL (paired, on the test queries); repeatable",
    )
    return p.parse_args(argv)


def read_pairs(specs: Sequence[str], methods: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """``METHOD=CONTROL`` specs as (method, control) of finished methods; a pair against the baseline is
    already in the table and is refused, as is a method paired with itself."""
    pairs = []
    for spec in specs:
        method, control = method_spec("--pair", spec, "CONTROL", methods)
        if control == method:
            raise InputError(f"--pair: expected METHOD=CONTROL, two different method names, got {spec!r}")
        if control not in methods:
            raise InputError(f"--pair: {control!r} is not one of the finished methods {list(methods)}")
        if control == baseline:
            raise InputError(f"--pair {spec!r}: every method is already tested against baseline {baseline!r}")
        if (method, control) in pairs:
            raise InputError(f"--pair {spec!r} is given twice")
        pairs.append((method, control))
    return pairs


def paired_tests(runs: list[dict], baseline: str, pairs: list[tuple[str, str]], measure: str) -> list[dict]:
    """Every method against ``baseline``, then each (method, control) of ``pairs``."""
    rows = paired_comparison(runs, baseline, measure)
    for method, control in pairs:
        rows += paired_comparison([r for r in runs if r["name"] in (method, control)], control, measure)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    measure = args.measure
    try:
        probes = None if args.probe_clock is None else read_probe_clock(args.probe_clock)
        runs = read_specs(args.specs, measure, read_time_scales(args.time_scale, args.specs), probes)
        if probes and not any(Path(r["run_dir"]).resolve() in probes for r in runs if not r["from_json"]):
            problem = "measured none of the runs read from run dirs (a frontier JSON's are on their clock)"
            raise InputError(f"--probe-clock: {problem}", path=args.probe_clock)
        zero_report = None if args.zero_shot is None else read_json(args.zero_shot)
        if zero_report is not None and measure not in zero_report.get("measures", {}):
            raise InputError(f"no {measure} among the report's measures", path=args.zero_shot)
        if args.baseline not in (names := list(dict.fromkeys(r["name"] for r in runs))):
            raise InputError(f"baseline {args.baseline!r} is not one of the finished methods {names}")
        zero = None if zero_report is None else zero_report["measures"][measure]
        add_extra_costs(runs, read_extra_costs(args.extra_cost, names, args.specs))
        rows = method_rows(runs, measure, zero)
        pairs = read_pairs(args.pair, names, args.baseline)
        paired = paired_tests(runs, args.baseline, pairs, measure)
    except InputError as err:  # one line, as compare_training
        print(f"frontier: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except ImportError:
        print("scipy is not installed: no significance tests (pip install scipy)", file=sys.stderr)
        paired = []
    shown = has_cpu_hours_without_dev_eval(rows), has_time_scales(rows)
    table, paired_table = format_table([_cells(r, measure, *shown) for r in rows]), format_table(paired)
    print(table, "", paired_table, sep="\n")
    keys = ("name", "seed", "run_dir", "wall_s", "cpu_s", "extra_cpu_s", "dev_eval_cpu_s", "peak_rss_gib")
    keys += ("best_dev", "doc_mean_cos", "per_query")  # what a rebuild from this JSON needs (read_published)
    if any(r.get("time_scale", 1.0) != 1.0 for r in runs):
        keys += ("time_scale", "measured_wall_s", "measured_cpu_s")
    per_run = [{k: r.get(k) for k in keys} | {m: r["test"].get(m) for m in (measure, RECALL)} for r in runs]
    result = {
        "measure": measure,
        "baseline": args.baseline,
        "methods": rows,
        "runs": per_run,
        "paired": paired,
        "zero_shot": zero_report and {"report": str(args.zero_shot), "measures": zero_report["measures"]},
        "probe_clock": None if args.probe_clock is None else str(args.probe_clock),
        "fronts": {front: [r["name"] for r in rows if r[f"front_{front}"]] for front in COSTS},
        "table": table,
        "paired_table": paired_table,
        **environment_info(Path(__file__).parent),
    }
    atomic.write_json(args.out, result)
    if args.markdown is not None:
        atomic.write_text(args.markdown, markdown(rows, paired, measure, zero, args.probe_clock is not None))
    if args.plot is not None:
        plot_frontier(rows, measure, zero, args.plot)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
