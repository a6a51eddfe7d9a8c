"""``dualenc report``: read run directories, write ``report.md``, ``report.json`` and the figures.

Output layout (``out``): ``report.md``, ``report.json`` (the table's rows and each run's settings) and
``report_figures/`` (``<run>_training.png`` per run, ``compare_curves.png`` for several runs). Where ``out``
is new or holds nothing but an earlier report it is written as a whole directory through
:func:`dualenc.io.atomic.atomic_dir`. Where it holds other files (the default for one run is the run's own
directory, next to its log) those are left alone: ``report_figures/`` is swapped in whole, then
``report.json`` and ``report.md`` are each replaced atomically, ``report.md`` last.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.reporting import plots
from dualenc.reporting.curves import table_row
from dualenc.reporting.highlights import config_highlights, made_by
from dualenc.reporting.markdown import report_markdown
from dualenc.reporting.run_files import RunFiles, read_run_dir

logger = logging.getLogger(__name__)

REPORT_MD, REPORT_JSON, FIGURES = "report.md", "report.json", "report_figures"
COMPARISON_PNG = "compare_curves.png"
NO_MATPLOTLIB = "matplotlib is not installed: no figures (pip install 'dualenc[plot]')"


def default_out(run_dirs: Sequence[str | os.PathLike]) -> Path:
    """The run's own directory for one run, ``./report`` for several."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """A distinct name per run: its directory's name, with its parents' names where two would clash."""
    parts = [d.resolve().parts for d in run_dirs]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(names)) < len(names):  # the same directory twice
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _figures(runs: list[RunFiles], folder: Path) -> tuple[dict[str, str], str | None]:
    """Draw each run's figure (and the comparison of several) into ``folder``; relative paths by run name."""
    folder.mkdir(parents=True, exist_ok=True)
    figures, used = {}, set()
    for run in runs:
        stem = _file_name(run.name)
        while stem in used or stem + "_training.png" == COMPARISON_PNG:
            stem += "_"
        used.add(stem)
        plots.save_png(plots.run_figure(run), folder / f"{stem}_training.png")
        figures[run.name] = f"{FIGURES}/{stem}_training.png"
    comparison = None
    if len(runs) > 1:
        plots.save_png(plots.comparison_figure(runs), folder / COMPARISON_PNG)
        comparison = f"{FIGURES}/{COMPARISON_PNG}"
    return figures, comparison


def _render(runs: list[RunFiles], figures_dir: Path) -> tuple[str, dict[str, Any]]:
    """Draw the figures into ``figures_dir``; the text of ``report.md`` and the object of ``report.json``."""
    notes = []
    if plots.matplotlib_available():
        figures, comparison = _figures(runs, figures_dir)
    else:
        logger.warning(NO_MATPLOTLIB)
        notes.append(NO_MATPLOTLIB)
        figures, comparison = {}, None
    rows = [table_row(run) for run in runs]
    text = report_markdown(runs, rows, figures, comparison, notes)
    data = {
        "rows": rows,
        "runs": [
            {
                "name": run.name,
                "run_dir": str(run.run_dir),
                "settings": config_highlights(run),
                "made_by": made_by(run),
                "test_report": str(run.test_path) if run.test is not None else None,
                "figure": figures.get(run.name),
            }
            for run in runs
        ],
        "comparison_figure": comparison,
        "notes": notes,
    }
    return text, data


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _only_a_report(out: Path) -> bool:
    """``out`` is missing, or a directory holding nothing but what a report writes."""
    if not out.exists():
        return True
    if not out.is_dir():
        raise InputError("--out is an existing file; a report is a directory", path=out)
    return {p.name for p in out.iterdir()} <= {REPORT_MD, REPORT_JSON, FIGURES}


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    test_report: str = "test.json",
) -> Path:
    """Read ``run_dirs`` and write their report into ``out`` (default :func:`default_out`); returns ``out``.

    Raises :class:`InputError` (file and line) for a missing or malformed log, config, summary or eval report.
    """
    if not run_dirs:
        raise InputError("no run directory given")
    paths = [Path(d) for d in run_dirs]
    runs = [
        read_run_dir(d, name=n, test_report=test_report) for d, n in zip(paths, run_names(paths), strict=True)
    ]
    out = Path(out) if out is not None else default_out(paths)
    if _only_a_report(out):
        with atomic.atomic_dir(out) as tmp:
            text, data = _render(runs, tmp / FIGURES)
            atomic.write_json(tmp / REPORT_JSON, _json_safe(data))
            atomic.write_text(tmp / REPORT_MD, text)
    else:  # beside other files (a run's own directory): each part replaced atomically, report.md last
        with atomic.atomic_dir(out / FIGURES) as tmp:
            text, data = _render(runs, tmp)
        atomic.write_json(out / REPORT_JSON, _json_safe(data))
        atomic.write_text(out / REPORT_MD, text)
    logger.info("wrote %s", out / REPORT_MD)
    return out
