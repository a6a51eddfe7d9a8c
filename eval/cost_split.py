"""Where training runs spent their CPU time and their encodes, by phase (train_summary.json's cost_by_phase).

    python eval/cost_split.py --out OUT/cost_split.json OUT    # OUT=outputs/frontier: its <name>_s<seed> runs
    python eval/cost_split.py --out split.json inbatch=runs/inbatch_s42 cache=runs/cache_s42

SPEC: ``NAME=RUN_DIR`` or a ROOT whose ``<name>_s<seed>`` subdirectories are runs of method ``<name>`` (as in
eval/frontier.py; here a run needs only its train_summary.json). Per method, means over its runs: CPU hours of
the main process in all and by phase (training steps and startup, cache fill, cache refresh, dev evaluation,
checkpoints; :mod:`dualenc.training.cost_meter`), the share of dev evaluation, and the encodes of every
process in thousands of sequences: with grad (a forward and a backward pass each) and without (a forward
pass). Runs without ``cost_by_phase`` (made before train_summary.json recorded it, or by another trainer,
such as eval/st_scifact.py) are named on stderr and left out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from frontier import RUN_NAME

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.input_files import read_json
from dualenc.io.provenance import environment_info
from dualenc.io.text_table import format_table
from dualenc.training.cost_meter import PHASES

SUMMARY = "train_summary.json"


def find_runs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``(method, run_dir)`` of each ``NAME=RUN_DIR`` and of each ROOT's finished ``<name>_s<seed>`` runs."""
    runs = []
    for spec in specs:
        name, sep, run_dir = spec.partition("=")
        if sep and not Path(spec).is_dir():
            if not name or not run_dir:
                raise InputError(f"expected NAME=RUN_DIR or a directory of <name>_s<seed> runs, got {spec!r}")
            if not (Path(run_dir) / SUMMARY).is_file():
                raise InputError(f"no {SUMMARY}: not a finished training run", path=run_dir)
            runs.append((name, Path(run_dir)))
            continue
        root = Path(spec)
        if not root.is_dir():
            raise InputError("expected NAME=RUN_DIR or a directory of <name>_s<seed> runs", path=root)
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if (match := RUN_NAME.fullmatch(sub.name)) and (sub / SUMMARY).is_file():
                runs.append((match["name"], sub))
    return runs


def read_costs(runs: list[tuple[str, Path]]) -> list[dict]:
    """Each run's ``cost_by_phase`` (checked to hold every phase), with its method and dir; runs without it
    are told on stderr and left out."""
    records = []
    for name, run_dir in runs:
        summary = read_json(run_dir / SUMMARY)
        cost = summary.get("cost_by_phase")
        if cost is None:
            why = f"no cost_by_phase (made before {SUMMARY} recorded it, or by another trainer)"
            print(f"{run_dir}: {why}: left out", file=sys.stderr)
            continue
        if sorted(cost) != sorted(PHASES):
            phases = f"cost_by_phase has the phases {sorted(cost)}, not {sorted(PHASES)}"
            raise InputError(phases, path=run_dir)
        records.append({"name": name, "run_dir": str(run_dir), "cpu_s": summary["cpu_s"], "phases": cost})
    if not records:
        raise InputError("no finished run recorded cost_by_phase (train with this version of dualenc)")
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def method_rows(records: list[dict]) -> list[dict]:
    """Per method (in order of appearance): runs, mean CPU hours in all and by phase, the dev evaluation's
    share of the CPU time, mean thousands of sequences encoded with and without grad (all phases)."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        row = {"method": name, "runs": len(mine), "cpu_h": _mean([r["cpu_s"] for r in mine]) / 3600}
        for phase in PHASES:
            row[f"{phase}_cpu_h"] = _mean([r["phases"][phase]["cpu_s"] for r in mine]) / 3600
        row["dev_eval_share"] = row["dev_eval_cpu_h"] / row["cpu_h"] if row["cpu_h"] > 0 else None
        for kind in ("grad", "nograd"):
            total = [sum(p[f"{kind}_sequences"] for p in r["phases"].values()) for r in mine]
            row[f"{kind}_ksequences"] = _mean(total) / 1000
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    cells = []
    for row in rows:
        cell = {"method": row["method"], "runs": str(row["runs"]), "CPU h": f"{row['cpu_h']:.3f}"}
        cell |= {phase.replace("_", " "): f"{row[f'{phase}_cpu_h']:.3f}" for phase in PHASES}
        share = row["dev_eval_share"]
        cell["dev eval %"] = "-" if share is None else f"{100 * share:.0f}"
        cell["k seq grad"] = f"{row['grad_ksequences']:.1f}"
        cell["k seq no-grad"] = f"{row['nograd_ksequences']:.1f}"
        cells.append(cell)
    return format_table(cells)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", metavar="SPEC", help="NAME=RUN_DIR, or a ROOT of <name>_s<seed> runs")
    p.add_argument("--out", required=True, type=Path, help="JSON output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        records = read_costs(find_runs(args.specs))
    except InputError as err:
        print(f"cost_split: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    rows = method_rows(records)
    text = table(rows)
    print(text)
    result = {"methods": rows, "runs": records, "table": text, **environment_info(Path(__file__).parent)}
    atomic.write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
