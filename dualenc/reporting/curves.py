"""The numbers of a report, computed from a run's log: curves (value against optimizer step), the best dev
point, and one table row per run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from dualenc.reporting.run_files import RunFiles, finite

Curve = list[tuple[int, float]]  # (optimizer step, value), by step


def curve(records: list[dict[str, Any]], key: str) -> Curve:
    """``key`` against the step, sorted by step; a step logged twice (a resumed run's log that was not
    truncated) keeps its last value. Nulls are left out; NaN and infinities are kept (gaps in a plot)."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if value is not None:
            by_step[record["step"]] = float(value)
    return sorted(by_step.items())


def moving_average(points: Curve, window: int) -> Curve:
    """Trailing mean over the last ``window`` finite values, at each point's step."""
    out, kept = [], []
    for step, value in points:
        if finite(value):
            kept.append(value)
        if kept:
            recent = kept[-window:]
            out.append((step, sum(recent) / len(recent)))
    return out


def smoothing_window(points: Curve) -> int | None:
    """The moving-average window worth drawing over a noisy curve (about 1/20 of it), None under 20 points."""
    return None if len(points) < 20 else max(5, len(points) // 20)


def dev_keys(records: list[dict[str, Any]]) -> list[str]:
    """Every ``dev/<measure>`` key of the log, in order of first appearance."""
    return list(dict.fromkeys(k for r in records for k in r if k.startswith("dev/")))


def eval_measure(run: RunFiles) -> str | None:
    """The measure that picks the best model: the config's ``train.eval_measure``, else the summary's, else
    the first dev measure logged."""
    measure = run.config.get("train", {}).get("eval_measure")
    if measure is None and run.summary is not None:
        measure = run.summary.get("eval_measure")
    if measure is None and dev_keys(run.records):
        measure = dev_keys(run.records)[0].removeprefix("dev/")
    return None if measure is None else str(measure)


@dataclass
class BestDev:
    measure: str
    value: float
    step: int


def best_dev(run: RunFiles) -> BestDev | None:
    """The highest logged value of the eval measure and its step (the first step on a tie, as training keeps
    the first), None without dev points."""
    measure = eval_measure(run)
    if measure is None:
        return None
    points = [(s, v) for s, v in curve(run.records, f"dev/{measure}") if finite(v)]
    if not points:
        return None
    step, value = max(points, key=lambda p: (p[1], -p[0]))
    return BestDev(measure, value, step)


def _last(points: Curve) -> float | None:
    return points[-1][1] if points else None


def _peak(run: RunFiles, key: str) -> float | None:
    """The peak of a memory value over the log and the summary (whose value is the end of the run's)."""
    values = [v for _, v in curve(run.records, key) if finite(v)]
    if run.summary is not None and finite(run.summary.get(key)):
        values.append(float(run.summary[key]))
    return max(values) if values else None


def wall_s(run: RunFiles) -> float | None:
    """Training wall time: the summary's ``wall_s``, else (a run without summary) the last ``elapsed_s``."""
    if run.summary is not None and finite(run.summary.get("wall_s")):
        return float(run.summary["wall_s"])
    return _last(curve(run.records, "elapsed_s"))


NO_TEST = "no test evaluation"


def table_row(run: RunFiles) -> dict[str, Any]:
    """One row of the report's table: steps, last loss, best dev, time, memory, test measures."""
    best = best_dev(run)
    step_times = [v for _, v in curve(run.records, "step_time_s") if finite(v)]
    row: dict[str, Any] = {
        "run": run.name,
        "loss": run.config.get("loss", {}).get("loss"),
        "steps": max(r["step"] for r in run.records),
        "finished": run.summary is not None,
        "last loss": _last(curve(run.records, "loss")),
        "dev measure": None if best is None else best.measure,
        "best dev": None if best is None else best.value,
        "best step": None if best is None else best.step,
        "wall s": wall_s(run),
        "median step s": statistics.median(step_times) if step_times else None,
        "peak RSS GiB": _peak(run, "peak_rss_gib"),
        "peak GPU GiB": _peak(run, "peak_mem_gib"),
        "test": run.test_path.name if run.test is not None else NO_TEST,
    }
    for measure, value in (run.test or {}).get("measures", {}).items():
        row[f"test {measure}"] = value
    return row
