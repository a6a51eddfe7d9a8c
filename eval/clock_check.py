"""How far a cross-machine time factor holds: each run's dev evaluation as a probe of its machine's speed.

    python eval/clock_check.py --out clock.json outputs/frontier=1.7744 outputs/frontier_calib=1.7744 \\
        outputs/frontier5=1.6391 outputs/frontier_calib3=1.6391

SPEC: ``ROOT=FACTOR``, a ROOT of ``<name>_s<seed>`` training runs (as in eval/frontier.py) and the factor
``eval/frontier.py --time-scale`` puts its runs on the reference clock with. ROOTs given the same FACTOR are
one machine's (a clock's) runs. The dev evaluation does the same work in every run of a protocol (the same dev
corpus and queries, encoded without grad), so its CPU seconds per million tokens (``cost_by_phase``'s
``dev_eval``) measure the speed of the machine a run ran on, beside the run's own work. Per clock: the pooled
rate (all its runs' dev-evaluation CPU seconds over all their tokens) and the spread of its runs' rates. The
``--anchor`` clock's FACTOR times its pooled rate is the reference rate (what dev evaluation would cost on the
reference clock); each other clock's implied factor is the reference rate over its pooled rate, told beside
the FACTOR given and how far the two differ. A method with runs on several clocks (a repeated run, or the same
work at another seed): its runs' CPU hours on the reference clock by the FACTORs given, by the implied factors
and by each run's own probe, and how far apart each puts them. Every method: the mean over its runs here of
their CPU hours by the FACTORs given and by each run's own probe, side by side (training alone: no
``--extra-cost`` such as a mining round). Runs that did not record ``cost_by_phase`` (another trainer's, such
as eval/st_scifact.py's) are named on stderr and left out.

A SPEC may also be a JSON this script wrote (its ``--out``): its clocks, roots and each run's probe join as
they were measured, so a clock check outlives its run folders and new roots join it:

    python eval/clock_check.py --out clock2.json clock.json outputs/frontier10=1.25 outputs/calib14=1.25

Without ``--anchor``, the first SPEC names the reference clock (a JSON's own anchor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from cost_split import find_runs, read_costs
from frontier import RUN_NAME

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.input_files import read_json
from dualenc.io.provenance import environment_info
from dualenc.io.text_table import format_table

PROBE = "dev_eval"


RUN_KEYS = ("name", "seed", "run_dir", "cpu_s", "probe_cpu_s", "probe_tokens")


def read_published(path: Path) -> dict:
    """A JSON of this script -> {"anchor": its anchor, "clocks": [{"factor", "roots", "runs"}]}, each run
    the record :func:`read_clocks` made of it (its probe's CPU seconds and tokens, its rate recomputed)."""
    try:
        report = read_json(path)
    except InputError as err:  # names the line of bad JSON
        raise InputError(
            f"not a JSON of eval/clock_check.py: {err.problem}", path=path, line=err.line
        ) from None
    try:
        anchor = float(report["anchor"])
        clocks = []
        for clock in report["clocks"]:
            runs = []
            for run in clock["runs"]:
                record = {key: run[key] for key in RUN_KEYS}
                if not record["probe_tokens"] > 0 or not record["probe_cpu_s"] > 0:
                    raise ValueError(record["run_dir"])
                runs.append(record | {"rate": record["probe_cpu_s"] / record["probe_tokens"] * 1e6})
            roots = [str(root) for root in clock["roots"]]
            factor = float(clock["factor"])
            if not runs or not roots or not 0 < factor < float("inf"):
                raise ValueError(clock)
            clocks.append({"factor": factor, "roots": roots, "runs": runs})
    except (KeyError, TypeError, ValueError):
        problem = "not a JSON of eval/clock_check.py (an anchor, clocks of roots and runs with their probes)"
        raise InputError(problem, path=path) from None
    if not clocks:
        raise InputError("a JSON of eval/clock_check.py with no clock", path=path)
    return {"anchor": anchor, "clocks": clocks}


def read_clock_specs(specs: Sequence[str]) -> list[tuple[str, float] | dict]:
    """``ROOT=FACTOR`` -> (ROOT, FACTOR), FACTOR positive and finite; a JSON file of this script -> its
    :func:`read_published` record. A ROOT is given once, whether as a directory or inside a JSON."""
    parsed: list[tuple[str, float] | dict] = []
    seen: set[str] = set()

    def claim(root: str, where: str = "") -> None:
        if str(Path(root)) in seen:
            raise InputError(f"{root!r} is given twice{where}")
        seen.add(str(Path(root)))

    for spec in specs:
        if Path(spec).is_file():
            published = read_published(Path(spec))
            for root in (root for clock in published["clocks"] for root in clock["roots"]):
                claim(root, f" (measured in {spec})")
            parsed.append(published)
            continue
        root, sep, value = spec.rpartition("=")
        try:
            factor = float(value) if sep else float("nan")
        except ValueError:
            factor = float("nan")
        if not root or not 0 < factor < float("inf"):
            problem = "expected ROOT=FACTOR with a positive FACTOR, or a JSON of eval/clock_check.py"
            raise InputError(f"{problem}, got {spec!r}")
        if not Path(root).is_dir():
            raise InputError("not a directory of <name>_s<seed> runs", path=root)
        claim(root)
        parsed.append((root, factor))
    return parsed


def first_factor(spec: tuple[str, float] | dict) -> float:
    """The reference clock's FACTOR when the first SPEC names it: a root's FACTOR, a JSON's anchor."""
    return spec["anchor"] if isinstance(spec, dict) else spec[1]


def probe_rate(phases: dict, run_dir: str) -> float:
    """CPU seconds per million tokens of the run's dev evaluation."""
    probe = phases[PROBE]
    if probe["nograd_tokens"] <= 0:
        raise InputError(
            f"cost_by_phase records no {PROBE} tokens: no probe of this run's speed", path=run_dir
        )
    return probe["cpu_s"] / probe["nograd_tokens"] * 1e6  # CPU-s / M tokens


def read_clocks(specs: list[tuple[str, float] | dict]) -> list[dict]:
    """One record per clock (distinct FACTOR, in order of appearance): its roots, runs with their probe rates,
    the pooled rate and the sample std of the runs' rates relative to their mean. A JSON's clocks join with
    their runs as recorded there."""
    clocks: dict[float, dict] = {}
    for spec in specs:
        if isinstance(spec, dict):
            for published in spec["clocks"]:
                factor = published["factor"]
                clock = clocks.setdefault(factor, {"factor": factor, "roots": [], "runs": []})
                clock["roots"] += published["roots"]
                clock["runs"] += published["runs"]
            continue
        root, factor = spec
        clock = clocks.setdefault(factor, {"factor": factor, "roots": [], "runs": []})
        clock["roots"].append(root)
        found = find_runs([root])
        if not found:
            raise InputError("no finished <name>_s<seed> training run here", path=root)
        try:
            records = read_costs(found)
        except InputError as err:  # its message names no root
            raise InputError(err.problem, path=err.path or root) from None
        for record in records:
            match = RUN_NAME.fullmatch(Path(record["run_dir"]).name)
            seed = int(match["seed"]) if match else None
            rate = probe_rate(record["phases"], record["run_dir"])
            probe = record["phases"][PROBE]
            clock["runs"].append(
                {"name": record["name"], "seed": seed, "run_dir": record["run_dir"], "cpu_s": record["cpu_s"]}
                | {"probe_cpu_s": probe["cpu_s"], "probe_tokens": probe["nograd_tokens"], "rate": rate}
            )
    seen: set[Path] = set()
    for run in (run for clock in clocks.values() for run in clock["runs"]):
        resolved = Path(run["run_dir"]).resolve()
        if resolved in seen:
            raise InputError(
                "this run is given twice (under two roots, or in a JSON and a root)", path=run["run_dir"]
            )
        seen.add(resolved)
    for clock in clocks.values():
        runs = clock["runs"]
        cpu, tokens = sum(r["probe_cpu_s"] for r in runs), sum(r["probe_tokens"] for r in runs)
        clock["pooled_rate"] = cpu / tokens * 1e6
        rates = [r["rate"] for r in runs]
        clock["rate_rel_std"] = statistics.stdev(rates) / statistics.mean(rates) if len(rates) > 1 else None
    return list(clocks.values())


def imply_factors(clocks: list[dict], anchor: float) -> float:
    """Sets each clock's ``implied_factor`` (reference rate / its pooled rate) and each run's; returns the
    reference rate, the ``anchor`` clock's FACTOR times its pooled rate."""
    anchored = next((c for c in clocks if c["factor"] == anchor), None)
    if anchored is None:
        raise InputError(
            f"--anchor {anchor:g} is not one of the FACTORs given {[c['factor'] for c in clocks]}"
        )
    reference = anchor * anchored["pooled_rate"]
    for clock in clocks:
        clock["implied_factor"] = reference / clock["pooled_rate"]
        clock["difference"] = clock["implied_factor"] / clock["factor"] - 1
        for run in clock["runs"]:
            run["implied_factor"] = reference / run["rate"]
    return reference


def runs_by_method(clocks: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """Each method's runs, each with its clock, in order of appearance."""
    found: dict[str, list[tuple[dict, dict]]] = {}
    for clock in clocks:
        for run in clock["runs"]:
            found.setdefault(run["name"], []).append((clock, run))
    return found


def cpu_hours(clock: dict, run: dict) -> dict[str, float]:
    """The run's CPU hours on the reference clock by its clock's given factor, by its clock's implied factor
    and by its own probe."""
    factors = {"given": clock["factor"], "implied": clock["implied_factor"]}
    factors["own_probe"] = run["implied_factor"]
    return {key: run["cpu_s"] * factor / 3600 for key, factor in factors.items()}


def repeats(clocks: list[dict]) -> list[dict]:
    """Each method with runs on more than one clock (a repeat, or the same work at another seed): each run's
    CPU hours on the reference clock by its clock's given factor, by its clock's implied factor and by its own
    probe, with the spread (max - min over the mean) of each."""
    found = runs_by_method(clocks)
    rows = []
    for name, seen in found.items():
        if len({clock["factor"] for clock, _ in seen}) < 2:
            continue
        hours = [cpu_hours(clock, run) for clock, run in seen]
        by = {key: [h[key] for h in hours] for key in ("given", "implied", "own_probe")}
        row = {
            "name": name,
            "seeds": [run["seed"] for _, run in seen],
            "runs": [run["run_dir"] for _, run in seen],
        }
        row["factors"] = [clock["factor"] for clock, _ in seen]
        for key, values in by.items():
            row[f"cpu_h_{key}"] = values
            row[f"spread_{key}"] = (max(values) - min(values)) / statistics.mean(values)
        rows.append(row)
    return rows


def methods_by_probe(clocks: list[dict]) -> list[dict]:
    """Every method, each run's CPU hours on the reference clock by its clock's given factor and by its own
    probe (the run's dev evaluation), averaged over the method's runs as the frontier averages seeds, and how
    far the probe's mean is from the given one (training alone, over the runs under the ROOTs given)."""
    found = runs_by_method(clocks)
    rows = []
    for name, seen in found.items():
        hours = [cpu_hours(clock, run) for clock, run in seen]
        given, own = (statistics.mean(h[key] for h in hours) for key in ("given", "own_probe"))
        row = {"name": name, "runs": len(seen), "seeds": [run["seed"] for _, run in seen]}
        rows.append(row | {"cpu_h_given": given, "cpu_h_own_probe": own, "difference": own / given - 1})
    return rows


def methods_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        cell = {"method": r["name"], "runs": str(r["runs"])}
        cell["CPU h by factors given"] = f"{r['cpu_h_given']:.3f}"
        cell["CPU h by own probes"] = f"{r['cpu_h_own_probe']:.3f}"
        cells.append(cell | {"difference %": f"{100 * r['difference']:+.1f}"})
    return format_table(cells)


def clock_table(clocks: list[dict]) -> str:
    cells = []
    for c in clocks:
        spread = "-" if c["rate_rel_std"] is None else f"{100 * c['rate_rel_std']:.1f}"
        cells.append(
            {
                "roots": ", ".join(c["roots"]),
                "runs": str(len(c["runs"])),
                "factor given": f"{c['factor']:.4f}",
            }
            | {"dev eval CPU-s/Mtok": f"{c['pooled_rate']:.1f}", "runs' std %": spread}
            | {
                "factor implied": f"{c['implied_factor']:.4f}",
                "difference %": f"{100 * c['difference']:+.1f}",
            }
        )
    return format_table(cells)


def repeat_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        runs = ", ".join(
            f"s{seed} x{factor:g}" for seed, factor in zip(r["seeds"], r["factors"], strict=True)
        )
        cell = {"method": r["name"], "runs (seed, clock)": runs}
        for key, label in (("given", "by factors given"), ("implied", "by implied"), ("own_probe", "by own")):
            hours = ", ".join(f"{h:.3f}" for h in r[f"cpu_h_{key}"])
            cell[f"CPU h {label}"] = f"{hours} ({100 * r[f'spread_{key}']:.1f}%)"
        cells.append(cell)
    return format_table(cells)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="ROOT=FACTOR (eval/frontier.py's --time-scale), or a JSON this script wrote",
    )
    p.add_argument(
        "--anchor",
        type=float,
        help="the FACTOR whose clock sets the reference rate (default: the first SPEC's, a JSON's anchor)",
    )
    p.add_argument("--out", required=True, type=Path, help="JSON output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        specs = read_clock_specs(args.specs)
        clocks = read_clocks(specs)
        anchor = first_factor(specs[0]) if args.anchor is None else args.anchor
        reference = imply_factors(clocks, anchor)
    except InputError as err:
        print(f"clock_check: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    rows, methods = repeats(clocks), methods_by_probe(clocks)
    text = clock_table(clocks)
    print(f"reference rate (anchor x{anchor:g}): {reference:.1f} CPU-s per million dev-evaluation tokens")
    print(text)
    if rows:
        print(repeat_table(rows))
    print(methods_table(methods))
    result = {"anchor": anchor, "reference_rate": reference, "clocks": clocks, "repeats": rows}
    result |= {"methods": methods, "table": text}
    atomic.write_json(args.out, result | environment_info(Path(__file__).parent))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
