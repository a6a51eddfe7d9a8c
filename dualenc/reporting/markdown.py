"""The text of ``report.md``: the table of runs, the comparison figure, then a section per run (its settings,
what made it, its test evaluation, its figure). Images are linked relative to the report."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from dualenc.reporting.curves import NO_TEST, best_dev
from dualenc.reporting.highlights import config_highlights, made_by
from dualenc.reporting.run_files import RunFiles

# how many decimals a float column shows
DECIMALS = {"wall s": 1, "median step s": 3, "peak RSS GiB": 2, "peak GPU GiB": 2}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.{DECIMALS.get(column, 4)}f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A pipe table of ``rows`` (columns in order of first appearance; a missing cell is "–"; a column with
    no value in any row is left out)."""
    columns = [
        c for c in dict.fromkeys(k for row in rows for k in row) if any(r.get(c) is not None for r in rows)
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _test_lines(run: RunFiles) -> list[str]:
    if run.test is None:
        return [f"- **test**: {NO_TEST} (no `{run.test_path.name}` in the run directory)"]
    measures = ", ".join(f"{m} {v:.4f}" for m, v in run.test["measures"].items())
    lines = [f"- **test** (`{run.test_path.name}`): {measures}"]
    config = run.test.get("config") if isinstance(run.test.get("config"), dict) else {}
    about = [f"model `{config['model']}`"] if config.get("model") else []
    about += [f"{k} `{config[k]}`" for k in ("topics", "qrels") if config.get(k)]
    if run.test.get("commit"):
        about.append(f"commit `{run.test['commit']}`")
    if about:
        lines.append(f"  - evaluated: {', '.join(about)}")
    return lines


def run_section(run: RunFiles, figure: str | None) -> str:
    """A run's section: its directory, settings, provenance, dev and test results and its figure."""
    lines = [f"## Run `{run.name}`", "", f"- **directory**: `{run.run_dir}`"]
    if run.summary is None:
        lines.append("- **status**: no `train_summary.json`: the run is still going, or was stopped")
    lines += [f"- **{label}**: {text}" for label, text in config_highlights(run).items()]
    lines += [
        f"- **{label}**: `{text}`" if label == "commit" else f"- **{label}**: {text}"
        for label, text in made_by(run).items()
    ]
    best = best_dev(run)
    if best is None:
        lines.append("- **best dev**: no dev points in the log")
    else:
        lines.append(f"- **best dev**: {best.measure} {best.value:.4f} at step {best.step}")
    lines += _test_lines(run)
    if figure is not None:
        lines += ["", f"![training curves of {run.name}]({figure})"]
    return "\n".join(lines)


def report_markdown(
    runs: list[RunFiles],
    rows: list[dict[str, Any]],
    figures: Mapping[str, str],
    comparison: str | None,
    notes: Sequence[str],
) -> str:
    """The whole ``report.md``; ``figures`` maps a run's name to its image's relative path."""
    title = f"Training report: {runs[0].name}" if len(runs) == 1 else f"Training report: {len(runs)} runs"
    parts = [f"# {title}", ""]
    parts += [f"> {note}" for note in notes] + ([""] if notes else [])
    parts += ["## Runs", "", markdown_table(rows), ""]
    parts.append(
        "Steps, last loss and best dev come from `train_log.jsonl`; wall time and peak memory from "
        "`train_summary.json` where the run finished; test measures from each run's eval report."
    )
    if comparison is not None:
        parts += ["", "## Curves compared", "", f"![loss and dev curves of the runs]({comparison})"]
    for run in runs:
        parts += ["", run_section(run, figures.get(run.name))]
    return "\n".join(parts) + "\n"
