"""The report's figures: one grid of titled panels per run, and the runs' loss and dev curves overlaid.

Every line carries a legend label, every axis a unit; a panel whose keys a run never logged is left out, and
the dev panel of a run without dev points says so in words. matplotlib is imported inside the functions, with
the headless Agg backend, so the package imports without it (:func:`matplotlib_available`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dualenc.reporting.curves import (
    Curve,
    best_dev,
    curve,
    dev_keys,
    eval_measure,
    moving_average,
    smoothing_window,
)
from dualenc.reporting.run_files import RunFiles

STEP = "optimizer step"
STALENESS_UNIT = "||e_cached - e_fresh||² / ||e_fresh||²"
COLUMNS = 3


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]  # (log key, legend label)
    smooth: bool = False  # a moving average over a long noisy curve
    sci: bool = False  # scientific tick labels


# the legend label of the logged ``loss`` by the config's loss (dualenc.reporting.highlights.LOSS_NOTES)
LOSS_LABELS = {
    "inbatch": "in-batch softmax CE",
    "cache": "-log p+ (interpretable CE, cache's rest lumped)",
    "cache_ce": "-log p+ (interpretable CE, cache's rest lumped)",
    "sce": "scalable CE over bucketed candidates",
}
RUN_PANELS = (
    Panel("Training loss", "loss (nats)", (("loss", "training loss"),), smooth=True),
    Panel(
        "Batch accuracy and probability of the positive",
        "fraction (0 to 1)",
        (
            ("accuracy", "accuracy: positive ranked first"),
            ("p_pos", "p+: softmax probability of the positive"),
            ("rest_mass", "P_R: softmax mass of the cache's rest"),
            ("coverage", "SCE coverage: rows in a bucket"),
        ),
        smooth=True,
    ),
    Panel("Learning rate", "learning rate (AdamW)", (("lr", "learning rate"),), sci=True),
    Panel("Gradient norm", "L2 norm, before clipping", (("grad_norm", "gradient norm"),), smooth=True),
    Panel("Step time", "seconds per optimizer step", (("step_time_s", "step time"),), smooth=True),
    Panel(
        "Peak memory",
        "GiB",
        (("peak_rss_gib", "CPU resident set, high-water mark"), ("peak_mem_gib", "GPU allocator peak")),
    ),
    Panel(
        "Negative cache: staleness",
        STALENESS_UNIT,
        (
            ("cache/staleness_refresh", "refreshed slots"),
            ("cache/staleness_written", "written-back slots"),
        ),
        smooth=True,
    ),
    Panel(
        "Negative cache: refreshed and filled",
        "fraction of the table's slots",
        (("cache/refreshed", "refreshed after the step"), ("cache/filled", "holding a document")),
    ),
    Panel(
        "Negative cache: rank of the positive",
        "rank among cached slots (1 = top)",
        (("cache/pos_rank", "mean rank of the positive"),),
        smooth=True,
    ),
    Panel(
        "Negative cache: slot age",
        "optimizer steps since encoded",
        (("cache/age_mean", "mean age"), ("cache/age_max", "oldest slot")),
    ),
)


def matplotlib_available() -> bool:
    """matplotlib can be imported (set to the headless Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return False
    return True


def _figure(panels: int, title: str):
    """A figure with a grid of ``panels`` axes (COLUMNS wide); the unused cells are removed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = min(COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(5.6 * cols, 3.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes[panels:]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize=13)
    return fig, axes[:panels]


def _draw(ax, points: Curve, label: str, smooth: bool, **style: Any) -> None:
    """One labelled curve; a long noisy one as faint raw values plus a labelled moving average."""
    steps, values = zip(*points, strict=True)
    window = smoothing_window(points) if smooth else None
    marker = style.pop("marker", "." if len(points) <= 30 else None)
    if window is None:
        ax.plot(steps, values, label=label, marker=marker, **style)
        return
    (raw,) = ax.plot(steps, values, label=f"{label}, per step", alpha=0.3, linewidth=0.8, **style)
    avg = moving_average(points, window)
    ax.plot(*zip(*avg, strict=True), label=f"{label}, mean of last {window}", color=raw.get_color())


def _absent(ax, label: str, colour: str) -> None:
    """A legend entry (an empty dotted line in the run's colour) for a run that has no such curve."""
    ax.plot([], [], linestyle=":", color=colour, label=label)


def _star(ax, step: int, value: float, label: str, colour: str) -> None:
    ax.plot([step], [value], marker="*", markersize=15, linestyle="none", color=colour, label=label)
    ax.lines[-1].set_markeredgecolor("black")


def _has_data(ax) -> bool:
    return any(len(line.get_xdata()) for line in ax.get_lines())


def _finish(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if _has_data(ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(STEP)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="best")


def _note(ax, text: str) -> None:
    """``text`` in the middle of a panel that has no curve (its axes' ticks hidden: there is no scale)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _dev_panel(ax, run: RunFiles) -> None:
    """Every dev measure logged, with the best point of the eval measure starred and labelled."""
    keys = dev_keys(run.records)
    for key in keys:
        _draw(ax, curve(run.records, key), f"dev {key.removeprefix('dev/')}", False, marker="o")
    best = best_dev(run)
    if best is not None:
        _star(ax, best.step, best.value, f"best {best.measure}: {best.value:.4f} at step {best.step}", "gold")
    if not keys:
        _note(ax, "no dev points in the log\n(no dev set, or no evaluation yet)")
    if not keys:
        _finish(ax, "Dev evaluation", "dev measure")
    elif len(keys) > 1:
        _finish(ax, f"Dev measures (best model by {eval_measure(run)})", "score (0 to 1)")
    else:
        measure = keys[0].removeprefix("dev/")
        _finish(ax, f"Dev {measure}", f"{measure} (0 to 1)")


def run_figure(run: RunFiles):
    """The run's training curves: loss, dev measure, then each :data:`RUN_PANELS` panel it logged."""
    present = [p for p in RUN_PANELS[1:] if any(curve(run.records, key) for key, _ in p.lines)]
    loss = run.config.get("loss", {}).get("loss", "?")
    fig, axes = _figure(2 + len(present), f"{run.name}: training curves (loss {loss})")
    for ax, panel in zip(axes[:1] + axes[2:], RUN_PANELS[:1] + tuple(present), strict=True):
        for key, label in panel.lines:
            points = curve(run.records, key)
            if points:
                _draw(ax, points, LOSS_LABELS.get(loss, label) if key == "loss" else label, panel.smooth)
        if panel.sci:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if not ax.get_lines():
            _note(ax, "not logged")
        _finish(ax, panel.title, panel.ylabel)
    _dev_panel(axes[1], run)
    return fig


def _compare_dev(ax, runs: list[RunFiles], colours: list[str]) -> None:
    """Each run's eval measure with its best point starred; a run without dev points has a legend entry
    that says so."""
    measures = set()
    for run, colour in zip(runs, colours, strict=True):
        measure = eval_measure(run)
        points = curve(run.records, f"dev/{measure}") if measure else []
        if not points:
            _absent(ax, f"{run.name}: no dev points", colour)
            continue
        measures.add(measure)
        _draw(ax, points, f"{run.name} ({measure})", False, marker="o", color=colour)
        best = best_dev(run)
        if best is not None:
            _star(ax, best.step, best.value, f"{run.name}: best {best.value:.4f} at step {best.step}", colour)
    if not _has_data(ax):
        _note(ax, "no run has dev points")
    names = " / ".join(sorted(measures)) or "measure"
    _finish(ax, f"Dev {names}", f"{names} (0 to 1)")


def _compare_smoothed(ax, runs: list[RunFiles], colours: list[str], key: str) -> None:
    """``key`` of each run, as a moving average where the curve is long; a legend entry for a run without."""
    for run, colour in zip(runs, colours, strict=True):
        points = curve(run.records, key)
        window = smoothing_window(points)
        if window is not None:
            points = moving_average(points, window)
        if points:
            suffix = "" if window is None else f", mean of last {window}"
            _draw(ax, points, f"{run.name}{suffix}", False, color=colour)
        else:
            _absent(ax, f"{run.name}: not logged", colour)


def comparison_figure(runs: list[RunFiles]):
    """The runs' loss and dev curves overlaid (one labelled line per run), and the cache staleness of the
    runs that have a cache."""
    stale = "cache/staleness_refresh"
    with_cache = [r for r in runs if curve(r.records, stale)]
    title = f"{len(runs)} runs compared: {', '.join(r.name for r in runs)}"
    fig, axes = _figure(3 if with_cache else 2, title)
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = [cycle[i % len(cycle)] for i in range(len(runs))]
    _compare_smoothed(axes[0], runs, colours, "loss")
    _finish(axes[0], "Training loss (each over its own negatives)", "loss (nats)")
    _compare_dev(axes[1], runs, colours)
    if with_cache:
        cache_colours = [c for r, c in zip(runs, colours, strict=True) if r in with_cache]
        _compare_smoothed(axes[2], with_cache, cache_colours, stale)
        _finish(axes[2], "Negative cache: staleness of refreshed slots", STALENESS_UNIT)
    return fig


def save_png(fig, path) -> None:
    """Write ``fig`` as a PNG at ``path``."""
    fig.savefig(path, format="png", dpi=100)
