"""``dualenc`` command line: encode, index, search, retrieve, evaluate.

Each subcommand parses flags and calls library functions; no logic lives here beyond wiring. Bad input ends
with one line ``dualenc: error: <file>:<line>: <problem>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dualenc.errors import InputError

logger = logging.getLogger("dualenc")

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _amp_dtype(amp: str, device):
    import torch

    if amp == "no" or device.type == "cpu":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, AMP_DTYPES[amp])


def _load_model(path: str, args, device):
    from dualenc.model.encoder import DualEncoder

    overrides = {}
    if getattr(args, "query_max_len", None):
        overrides["query_max_len"] = args.query_max_len
    if getattr(args, "passage_max_len", None):
        overrides["passage_max_len"] = args.passage_max_len
    model = DualEncoder.from_pretrained(path, **overrides)
    return model.to(device).eval()


def cmd_encode(args) -> int:
    from accelerate import PartialState

    from dualenc.io.readers import read_collection, read_queries
    from dualenc.retrieval.encode import encode_corpus

    state = PartialState(cpu=args.device == "cpu")
    device = state.device
    kind = "query" if args.topics else "doc"
    source = args.topics or args.collection
    data = read_queries(source) if args.topics else read_collection(source)
    model = _load_model(args.model, args, device)
    if state.is_main_process:
        logger.info("encoding %d %ss from %s on %d process(es)", len(data), kind, source, state.num_processes)
    encode_corpus(
        model,
        data,
        args.output,
        kind=kind,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=device,
        autocast_dtype=_amp_dtype(args.amp, device),
        storage_dtype=args.storage_dtype,
        progress=state.is_local_main_process and not args.quiet,
        model_name=str(args.model),
        source=str(source),
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
    )
    return 0


def cmd_index(args) -> int:
    from dualenc.retrieval.index import index_from_embeddings

    index_from_embeddings(
        args.embeddings,
        args.output,
        args.factory,
        per_shard=args.per_shard,
        train_size=args.train_size,
        progress=not args.quiet,
    )
    logger.info("wrote %s index to %s", args.factory, args.output)
    return 0


def _write(run, args) -> None:
    from dualenc.io.runs import write_run

    write_run(run, args.output, format=args.output_format, tag=args.tag, k=args.hits)
    logger.info("wrote %d queries to %s (%s format)", len(run), args.output, args.output_format)


def cmd_search(args) -> int:
    import numpy as np

    from dualenc.io.embeddings import load_embeddings
    from dualenc.retrieval.search import search_vectors

    shards = load_embeddings(args.queries)
    query_ids = [qid for shard in shards for qid in shard.ids]
    query_emb = np.concatenate([np.asarray(shard.emb, dtype=np.float32) for shard in shards])
    run = search_vectors(
        query_ids, query_emb, args.index, k=args.hits, device=args.device, search_params=args.search_params
    )
    _write(run, args)
    return 0


def cmd_retrieve(args) -> int:
    import torch

    from dualenc.io.readers import read_queries
    from dualenc.retrieval.encode import encode_texts
    from dualenc.retrieval.search import search_vectors

    device = torch.device(args.device)
    topics = read_queries(args.topics)
    model = _load_model(args.encoder, args, device)
    query_emb = encode_texts(
        model,
        list(topics["text"]),
        kind="query",
        batch_size=args.batch_size,
        device=device,
        autocast_dtype=_amp_dtype(args.amp, device),
        progress=not args.quiet,
    )
    run = search_vectors(
        list(topics["id"]),
        query_emb,
        args.index,
        k=args.hits,
        device=args.device,
        search_params=args.search_params,
    )
    _write(run, args)
    return 0


def cmd_evaluate(args) -> int:
    from dualenc.evaluation.measures import check_run_queries, evaluate, evaluate_per_query, format_table
    from dualenc.io.readers import read_qrels
    from dualenc.io.runs import read_run

    qrels = read_qrels(args.qrels)
    run = read_run(args.run)
    check_run_queries(
        run, qrels, run_path=args.run, qrels_path=args.qrels, allow_unknown=args.allow_unknown_queries
    )
    results = evaluate(qrels, run, args.measures, missing_as_zero=not args.skip_missing)
    per_query = (
        evaluate_per_query(qrels, run, args.measures, missing_as_zero=not args.skip_missing)
        if args.per_query
        else None
    )
    if args.json:
        print(json.dumps(results if per_query is None else {"aggregate": results, "per_query": per_query}))
        return 0
    if per_query is not None:
        rows = [{"qid": qid, **values} for qid, values in per_query.items()]
        print(format_table(rows + [{"qid": "all", **results}]))
    else:
        print(format_table([{"run": Path(args.run).name, **results}]))
    return 0


def cmd_mine(args) -> int:
    from dualenc.io.readers import read_qrels, read_queries
    from dualenc.io.runs import read_run
    from dualenc.retrieval.mine import mine_hard_negatives, write_groups

    queries = None
    if args.topics:
        topics = read_queries(args.topics)
        queries = dict(zip(topics["id"], topics["text"], strict=True))
    groups = mine_hard_negatives(
        read_run(args.run),
        read_qrels(args.qrels),
        depth=args.depth,
        skip_top=args.skip_top,
        num_negatives=args.num_negatives,
        min_relevance=args.min_relevance,
        queries=queries,
    )
    count = write_groups(groups, args.output)
    logger.info("wrote %d query groups to %s", count, args.output)
    return 0


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
    parser = argparse.ArgumentParser(prog="dualenc", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("search", help="search pre-encoded query vectors (`dualenc encode --topics`)")
    p.add_argument("--queries", required=True, help="query embeddings dir")
    _add_run_flags(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("retrieve", help="encode topics + search + write the run (pyserini-style flags)")
    p.add_argument("--topics", required=True)
    p.add_argument("--encoder", required=True, help="model dir")
    p.add_argument("--batch-size", type=int, default=64)
    _add_run_flags(p)
    _add_model_flags(p)
    p.set_defaults(func=cmd_retrieve)

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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
