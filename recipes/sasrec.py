"""SASRec with CE, SCE, BCE, gBCE or CE⁻ on a temporal split: select on validation, report test metrics.

    python recipes/sasrec.py --config recipes/configs/sasrec/sasrec_sce.yaml [key=value ...] [--seeds 1235 37]
    python recipes/sasrec.py --combine bench/results/sasrec_ml100k.json outputs/sasrec/*.json

The SCE paper's protocol (Mezentsev et al., RecSys 2024; ALGORITHMS.md Part B 2.4-2.5): global temporal split
at the 95th-percentile timestamp, full-catalog ranking without seen items, NDCG@10 / HR@10 / COV@10, model
selection by validation NDCG@10 with early stopping. One seed's training is
:func:`dualenc.recsys.train.train_seed` (seeding and memory measurement are described there); this script runs
the seeds, prints the table, writes the JSON and combines result files. ``--help-config`` lists every
``key=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.provenance import environment_info
from dualenc.recsys.config import SASRecConfig, describe_sasrec_config, load_sasrec_config
from dualenc.recsys.train import load_split, train_seed

logger = logging.getLogger("sasrec")
REPO = Path(__file__).resolve().parents[1]
METRICS = ("NDCG@10", "HR@10", "COV@10")
MEMORY_METHOD = (
    "CPU resident set size of this process: ru_maxrss (resource.getrusage, process lifetime) "
    "and VmHWM after a /proc/self/clear_refs reset at the start of each seed"
)


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one seed) of the test metrics and the costs."""
    values = {f"test_{m}": [r["test"][m] for r in runs] for m in METRICS}
    values |= {key: [r[key] for r in runs] for key in ("train_s", "epochs", "peak_rss_mib")}
    std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
    return {"mean": {k: statistics.fmean(v) for k, v in values.items()}, "std": std}


def print_table(name: str, runs: list[dict], summary: dict) -> None:
    """One row per seed and a mean ± std row: epochs, best epoch, valid/test metrics, memory, time."""
    head = ["run", "seed", "epochs", "best", "val NDCG@10", *METRICS, "peak RSS MiB", "train s"]
    rows = [
        [name, str(r["seed"]), str(r["epochs"]), str(r["best_epoch"]), f"{r['valid']['NDCG@10']:.4f}"]
        + [f"{r['test'][m]:.4f}" for m in METRICS]
        + [f"{r['peak_rss_mib']:.0f}", f"{r['train_s']:.0f}"]
        for r in runs
    ]
    mean, std = summary["mean"], summary["std"]
    rows.append(
        [name, "mean", f"{mean['epochs']:.1f}", "", ""]
        + [f"{mean['test_' + m]:.4f}±{std['test_' + m]:.4f}" for m in METRICS]
        + [f"{mean['peak_rss_mib']:.0f}", f"{mean['train_s']:.0f}"]
    )
    widths = [max(len(row[c]) for row in [head, *rows]) + 2 for c in range(len(head))]
    for row in [head, *rows]:
        print("".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def run(cfg: SASRecConfig, seeds: Sequence[int]) -> dict:
    """Train every seed, print the table, write and return the results JSON."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    split = load_split(cfg)
    logger.info("data %s", split.stats())
    runs = [train_seed(cfg, split, seed) for seed in seeds]
    summary = summarise(runs)
    print_table(cfg.name, runs, summary)
    result = {
        "name": cfg.name,
        "config": dataclasses.asdict(cfg),
        "seeds": list(seeds),
        "dataset": split.stats(),
        "memory_method": MEMORY_METHOD,
        **environment_info(REPO),
        **summary,
        "per_seed": runs,
    }
    out = Path(cfg.output_json or f"outputs/sasrec/{cfg.name}.json")
    atomic.write_json(out, result)
    logger.info("wrote %s", out)
    return result


def combine(out: str, inputs: Sequence[str]) -> dict:
    """Gather JSON files into one ``{"runs": {name: result}}`` file (name: the run's, else the file stem)."""
    runs = {}
    for path in inputs:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        runs[result.get("name") or Path(path).stem] = result
    atomic.write_json(out, {"runs": runs})
    return {"runs": runs}


def main(argv: Sequence[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML recipe (recipes/configs/sasrec/*.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", help="one model per seed (default: the config's seed)")
    p.add_argument("--combine", metavar="OUT_JSON", help="merge the result JSON files given as arguments")
    p.add_argument("--help-config", action="store_true", help="list every config key with help text")
    p.add_argument("overrides", nargs="*", help="key=value overrides (with --combine: result JSON files)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value may come anywhere
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides + args.overrides
    if args.help_config:
        print(describe_sasrec_config())
        return None
    if args.combine:
        return combine(args.combine, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_sasrec_config(args.config, args.overrides)
        return run(cfg, args.seeds or [cfg.seed])
    except InputError as err:
        print(f"sasrec: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
