"""The ``dualenc`` parser and entry point: one subparser per command of :mod:`dualenc.cli.commands`.

Bad input ends with one line ``dualenc: error: <file>:<line>: <problem>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dualenc.cli.commands import cmd_encode, cmd_evaluate, cmd_index, cmd_mine, cmd_retrieve, cmd_search
from dualenc.errors import InputError

DESCRIPTION = "dualenc command line: encode, index, search, retrieve, evaluate, mine."


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
    sub = parser.add_subparsers(dest="command", required=True)
    _encode_parser(sub)
    _index_parser(sub)
    _search_parser(sub)
    _retrieve_parser(sub)
    _evaluate_parser(sub)
    _mine_parser(sub)
    return parser


def _encode_parser(sub) -> None:
    p = sub.add_parser("encode", help="encode a collection (or topics) into an embeddings dir; resumable")
    p.add_argument(
        "--model",
        required=True,
        help="dualenc / sentence-transformers / Hugging Face model dir (custom towers: module on PYTHONPATH)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--collection", help="collection: .tsv (id<TAB>text[<TAB>...]) or BEIR .jsonl")
    src.add_argument("--topics", help="queries (.tsv or BEIR .jsonl), encoded with the query tower")
    p.add_argument("--output", required=True, help="embeddings directory")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=8192, help="rows per resumable chunk")
    p.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--device", default=None, help="'cpu' forces CPU; default: what Accelerate picks")
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
        "--allow-unknown-queries", action="store_true", help="accept run queries absent from the qrels"
    )
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
    p.add_argument("--output", required=True, help="JSONL groups (train_format: groups)")
    p.set_defaults(func=cmd_mine)


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
        return args.func(args)
    except InputError as err:
        print(f"dualenc: error: {err}", file=sys.stderr)
        return 2
