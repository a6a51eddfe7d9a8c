"""What each ``dualenc`` subcommand does: read its flags, call the library, write its output."""

from __future__ import annotations

import json
import logging
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
    from dualenc.retrieval.encode_to_disk import encode_corpus

    state = PartialState(cpu=args.device == "cpu")
    device = state.device
    kind = "query" if args.topics else "doc"
    source = args.topics or args.collection
    reader = read_queries if args.topics else read_collection
    data = reader(source, columns=args.columns)
    model = _load_model(args.model, args, device)
    if state.is_main_process:
        logger.info("encoding %d %ss from %s on %d process(es)", len(data), kind, source, state.num_processes)
    try:
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
            overwrite=args.overwrite,
        )
    finally:  # a process exiting with its gloo group alive aborts now and then in the teardown
        state.destroy_process_group()
    return 0


def cmd_index(args) -> int:
    from dualenc.retrieval.index_dir import index_from_embeddings

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

    from dualenc.io.embeddings import load_embeddings, read_meta
    from dualenc.retrieval.search import search_vectors

    shards = load_embeddings(args.queries)
    query_ids = [qid for shard in shards for qid in shard.ids]
    query_emb = np.concatenate([np.asarray(shard.emb, dtype=np.float32) for shard in shards])
    run = search_vectors(
        query_ids,
        query_emb,
        args.index,
        k=args.hits,
        device=args.device,
        search_params=args.search_params,
        query_meta=read_meta(args.queries),
    )
    _write(run, args)
    return 0


def cmd_retrieve(args) -> int:
    import torch

    from dualenc.io.readers import read_queries
    from dualenc.retrieval.encode import encode_texts, model_fingerprint
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
    # the index must come from this encoder's weights: the check compares fingerprints
    query_meta = {"model": args.encoder, "model_fingerprint": model_fingerprint(model)}
    run = search_vectors(
        list(topics["id"]),
        query_emb,
        args.index,
        k=args.hits,
        device=args.device,
        search_params=args.search_params,
        query_meta=query_meta,
    )
    _write(run, args)
    return 0


def cmd_evaluate(args) -> int:
    from dualenc.evaluation.measures import check_run_queries, evaluate, evaluate_per_query
    from dualenc.io.qrels import read_qrels
    from dualenc.io.runs import read_run
    from dualenc.io.text_table import format_table

    qrels = read_qrels(args.qrels)
    run = read_run(args.run)
    check_run_queries(
        run,
        qrels,
        run_path=args.run,
        qrels_path=args.qrels,
        strict=args.strict,
        missing_as_zero=not args.skip_missing,
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
    from dualenc.io import read_qrels, read_queries
    from dualenc.io.readers import read_collection
    from dualenc.io.runs import read_run
    from dualenc.retrieval.mine import as_tevatron, mine_hard_negatives, write_groups

    if args.format == "tevatron" and not (args.topics and args.collection):
        raise InputError("--format tevatron writes query and passage texts: give --topics and --collection")
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
    if args.format == "tevatron":
        rows = read_collection(args.collection, columns=args.columns)
        passages = dict(zip(rows["id"], zip(rows["title"], rows["text"], strict=True), strict=True))
        groups = as_tevatron(groups, passages)
    count = write_groups(groups, args.output)
    logger.info("wrote %d query groups to %s (%s format)", count, args.output, args.format)
    return 0


def cmd_report(args) -> int:
    from dualenc.reporting import write_report

    out = write_report(args.run_dirs, args.out, test_report=args.test_report)
    print(f"report: {out / 'report.md'}")
    return 0
