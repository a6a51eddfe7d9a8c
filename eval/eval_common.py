"""The shared command line of the ``eval/`` scripts: run the pipeline, score baselines, print, write JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dualenc.errors import InputError
from dualenc.io import atomic


def data_root() -> Path:
    """``$DUALENC_DATA`` or ``../shared/data`` next to the repository."""
    return Path(os.environ.get("DUALENC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def anserini_defaults(
    data: Path,
    name: str,
    measures: str,
    *,
    collection: Path,
    topics_suffix: str = ".txt",
    baselines: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """The ``defaults`` of :func:`main` for files named as Anserini ships them, in ``data``:
    ``topics.<name><topics_suffix>`` and ``qrels.<name>.txt``; ``baselines`` maps a label to a run file."""
    return {
        "collection": str(collection),
        "topics": str(data / f"topics.{name}{topics_suffix}"),
        "qrels": str(data / f"qrels.{name}.txt"),
        "measures": measures,
        "baselines": [f"{label}={path}" for label, path in (baselines or {}).items()],
    }


def build_parser(name: str, defaults: dict, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=name, description=description)
    p.add_argument("--model", required=True, help="dualenc / sentence-transformers / Hugging Face model dir")
    p.add_argument("--collection", default=defaults["collection"], help="collection (.tsv or BEIR .jsonl)")
    p.add_argument("--topics", default=defaults["topics"])
    p.add_argument("--qrels", default=defaults["qrels"])
    p.add_argument("--measures", default=defaults["measures"], help="preset or ir-measures strings")
    p.add_argument(
        "--baseline-run",
        action="append",
        default=list(defaults.get("baselines", [])),
        help="a run to score next to ours (NAME=PATH); repeatable",
    )
    p.add_argument("--label", default=None, help="name of our system in the table (default: the model dir)")
    p.add_argument(
        "--work-dir", default=None, help="embeddings/index/run cache (default: outputs/<name>/<model>)"
    )
    p.add_argument("--output-json", default=None, help="report path (default: <work-dir>/report.json)")
    p.add_argument("--factory", default="Flat", help='faiss.index_factory string; "Flat" = exact search')
    p.add_argument("--search-params", default=None, help='e.g. "nprobe=64"')
    p.add_argument("--hits", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--query-max-len", type=int, default=None)
    p.add_argument("--passage-max-len", type=int, default=None)
    return p


def main(
    name: str,
    defaults: dict,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> dict:
    """Run one eval script; returns the report it wrote.

    ``prepare``, if given, sees the parsed arguments first (e.g. to write a default input file on first use).
    """
    from dualenc.evaluation.measures import evaluate
    from dualenc.evaluation.pipeline import PipelineConfig, run_pipeline
    from dualenc.io.qrels import read_qrels
    from dualenc.io.runs import read_run
    from dualenc.io.text_table import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser(name, defaults, description).parse_args(argv)
    from dualenc.model.model_dir import resolve_model_path

    model_path = resolve_model_path(args.model).resolve()
    model_name = (
        model_path.parent.name
        if model_path.name in ("model", "final_model", "best_model")
        else model_path.name
    )
    work_dir = Path(args.work_dir or Path("outputs") / name / model_name)
    cfg = PipelineConfig(
        model=args.model,
        collection=args.collection,
        topics=args.topics,
        qrels=args.qrels,
        work_dir=str(work_dir),
        measures=args.measures,
        factory=args.factory,
        hits=args.hits,
        batch_size=args.batch_size,
        device=args.device,
        search_params=args.search_params,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
    )
    try:
        if prepare is not None:
            prepare(args)
        report = run_pipeline(cfg)
        rows = [{"system": args.label or f"{model_name} ({args.factory})", **report["measures"]}]
        report["baselines"] = {}
        for spec in args.baseline_run:
            label, _, path = spec.rpartition("=")
            scores = evaluate(read_qrels(args.qrels), read_run(path), args.measures)
            report["baselines"][label or Path(path).name] = {"run": path, "measures": scores}
            rows.append({"system": label or Path(path).name, **scores})
    except InputError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    table = format_table(rows)
    print(f"\n{name}: {report['counts']['docs']} docs, {report['counts']['queries']} queries\n{table}")
    out = Path(args.output_json or work_dir / "report.json")
    report["table"] = table
    atomic.write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
    return report
