"""The figure of eval/compare_training.py: training curves of several runs side by side (needs matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path

from dualenc.io import atomic


def plot_curves(runs: list[dict], zero_shot_dev: float | None, path: Path, measure: str) -> bool:
    """Training loss, dev measure (and cache staleness) against the step, one line per run, as a PNG at
    ``path``; False (with a message) without matplotlib.

    ``runs`` are :func:`compare_training.summarise_run` records; ``zero_shot_dev`` draws the dev score of the
    model before training as a horizontal line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = ["loss", "dev"] + (["staleness"] if any(r["curves"]["staleness"] for r in runs) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r["name"] for r in runs))  # one colour per name, one line style per seed
    for run in runs:
        label = f"{run['name']} ({Path(run['run_dir']).name})"
        colour = colours[names.index(run["name"]) % len(colours)]
        style = ["-", "--", ":", "-."][[r for r in runs if r["name"] == run["name"]].index(run) % 4]
        for ax, key in zip(axes, panels, strict=True):
            points = run["curves"][key]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    marker="o" if key == "dev" else None,
                    label=label,
                    color=colour,
                    linestyle=style,
                )
    if zero_shot_dev is not None:
        axes[1].axhline(zero_shot_dev, color="grey", linewidth=3, alpha=0.5, label="before training")
    labels = {
        "loss": "training loss (each over its own negatives)",
        "dev": f"dev {measure}",
        "staleness": "table staleness of refreshed slots",
    }
    for ax, key in zip(axes, panels, strict=True):
        ax.set(xlabel="optimizer step", ylabel=labels[key])
        ax.grid(True, alpha=0.3)
    handles, labels_ = axes[1].get_legend_handles_labels()  # every run has a dev curve; outside the panels
    axes[-1].legend(handles, labels_, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True
