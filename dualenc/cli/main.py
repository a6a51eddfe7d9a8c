"""The ``dualenc`` parser and entry point: one subparser per command of :mod:`dualenc.cli.commands`.

Bad input ends with one line ``dualenc: error: <file>:<line>: <problem>`` and exit status 2, and so does
every other expected failure (an OS error, a corrupt model, embeddings, gzip or index file): the flags are
checked before any file is touched (:mod:`dualenc.cli.checks`), and the traceback is printed only with
``--debug`` or ``DUALENC_DEBUG=1``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from dualenc.cli.checks import check_args, failure_line
from dualenc.cli.commands import (
    cmd_encode,
    cmd_evaluate,
    cmd_index,
    cmd_mine,
    cmd_report,
    cmd_retrieve,
    cmd_search,
)

DESCRIPTION = "dualenc command line: encode, index, search, retrieve, evaluate, mine, report."


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query-max-len", type=int, help="override the model's query length (tokens)")
    parser.add_argument("--passage-max-len", type=int, help="override the model's passage length (tokens)")
    parser.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "no"],
        default="auto",
        help="autocast on GPU (auto: bf16 where supported); ignored on CPU",
    )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index", required=True, help="a `dualenc index` dir, or an embeddings dir (exact search)"
    )
    parser.add_argument("--hits", type=int, default=1000, help="documents per query")
    parser.add_argument("--output", required=True, help="run file to write")
    parser.add_argument("--output-format", choices=["trec", "msmarco"], default="trec")
    parser.add_argument("--tag", default="dualenc", help="run tag (TREC format, 6th column)")
    parser.add_argument("--search-params", help='FAISS parameters, e.g. "nprobe=32" or "efSearch=256"')
    parser.add_argument("--device", default="cpu", help="torch device for query encoding and exact search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualenc", description=DESCRIPTION)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error too (or DUALENC_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _encode_parser(sub)
    _index_parser(sub)
    _search_parser(sub)
    _retrieve_parser(sub)
    _evaluate_parser(sub)
    _mine_parser(sub)
    _report_parser(sub)
    return parser


def _encode_parser(sub) -> None:
    p = sub.add_parser("encode", help="encode a collection (or topics) into an embeddings dir; resumable")
    p.add_argument(
        "--model",
        required=True,
        help="dualenc / sentence-transformers / Hugging Face model dir (custom towers: module on PYTHONPATH)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--collection",
        help="collection: .tsv (id<TAB>text, id<TAB>title<TAB>text, or see --columns) or BEIR .jsonl",
    )
    p.add_argument(
        "--columns",
        help='TSV columns in order, e.g. "id,text,-" (names: id, title, text; "-" ignores a column); '
        "default: 2 or 3 columns as above, or a header line naming them (id<TAB>text<TAB>title)",
    )
    src.add_argument("--topics", help="queries (.tsv or BEIR .jsonl), encoded with the query tower")
    p.add_argument("--output", required=True, help="embeddings directory")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=8192, help="rows per resumable chunk")
    p.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--device", default=None, help="'cpu' forces CPU; default: what Accelerate picks")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="encode from scratch even if --output holds (or began) embeddings of another model/collection",
    )
    _add_model_flags(p)
    p.set_defaults(func=cmd_encode)


def _index_parser(sub) -> None:
    p = sub.add_parser("index", help="build a FAISS index (any index_factory string) from an embeddings dir")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument(
        "--factory",
        default="Flat",
        help='faiss.index_factory string: "Flat", "IVF4096,Flat", "HNSW32", "IVF4096,PQ64"',
    )
    p.add_argument(
        "--per-shard", action="store_true", help="one index per embeddings shard (merged at search)"
    )
    p.add_argument("--train-size", type=int, default=262_144, help="vectors sampled to train IVF/PQ")
    p.set_defaults(func=cmd_index)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="search pre-encoded query vectors (`dualenc encode --topics`)")
    p.add_argument("--queries", required=True, help="query embeddings dir")
    _add_run_flags(p)
    p.set_defaults(func=cmd_search)


def _retrieve_parser(sub) -> None:
    p = sub.add_parser("retrieve", help="encode topics + search + write the run (pyserini-style flags)")
    p.add_argument("--topics", required=True)
    p.add_argument("--encoder", required=True, help="model dir")
    p.add_argument("--batch-size", type=int, default=64)
    _add_run_flags(p)
    _add_model_flags(p)
    p.set_defaults(func=cmd_retrieve)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run against qrels with ir-measures")
    p.add_argument("--qrels", required=True)
    p.add_argument("--run", required=True)
    p.add_argument(
        "--measures",
        default="trec-dl",
        help='a preset (msmarco-dev, trec-dl, beir) or ir-measures strings, e.g. "nDCG@10 RR(rel=2)@10"',
    )
    p.add_argument("--json", action="store_true", help="print one JSON object {measure: value}")
    p.add_argument("--per-query", action="store_true", help="also print each query's values")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="average over the run's queries only (default: a qrels query missing from the run counts 0)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse run queries absent from the qrels (default: they are ignored, with a warning)",
    )
    p.add_argument("--allow-unknown-queries", action="store_true", help=argparse.SUPPRESS)  # now the default
    p.set_defaults(func=cmd_evaluate)


def _mine_parser(sub) -> None:
    p = sub.add_parser(
        "mine", help="hard negatives from a run: top-k minus the query's positives (JSONL groups)"
    )
    p.add_argument("--run", required=True, help="a run over the training queries (TREC or MS MARCO format)")
    p.add_argument(
        "--qrels", required=True, help="training qrels: judged docs with rel >= --min-relevance are positives"
    )
    p.add_argument("--topics", help="training queries; their text is stored in the groups")
    p.add_argument("--depth", type=int, default=100, help="look at the top DEPTH documents of each query")
    p.add_argument("--skip-top", type=int, default=0, help="ignore the first N (likely unjudged positives)")
    p.add_argument("--num-negatives", type=int, default=None, help="keep at most N negatives per query")
    p.add_argument("--min-relevance", type=int, default=1)
    p.add_argument(
        "--format",
        choices=("groups", "tevatron"),
        default="groups",
        help="groups: ids (train_format: groups); tevatron: query and passage texts (needs --topics and "
        "--collection)",
    )
    p.add_argument("--collection", help="the collection the run searched (for --format tevatron)")
    p.add_argument("--columns", help="TSV columns of --collection, as for `dualenc encode --columns`")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.set_defaults(func=cmd_mine)


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="report.md, report.json and figures of training runs (train_log.jsonl, config.yaml)"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output directories")
    p.add_argument(
        "--out", default=None, help="report directory (default: the run's own dir for one run, ./report)"
    )
    p.add_argument("--test-report", default="test.json", help="eval report inside each run dir, if any")
    p.set_defaults(func=cmd_report)


def _quiet_libraries() -> None:
    """Silence library progress bars that say nothing useful here (dataset building, weight loading)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_libraries()
    try:
        check_args(args)  # before any file is touched
        return args.func(args)
    except Exception as err:
        line = failure_line(err, args)
        if line is None:  # a bug: keep the traceback
            raise
        if args.debug or os.environ.get("DUALENC_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        print(f"dualenc: error: {line}", file=sys.stderr)
        return 2
