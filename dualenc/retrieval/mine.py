"""Hard-negative mining (ANCE, Tevatron): the top-ranked documents of a run that are not judged relevant.

A run of the current model (or BM25) over the training queries gives, per query, a ranking; its top ``depth``
documents minus the query's positives are its hard negatives. The output is the ``groups`` training format
(:mod:`dualenc.training.formats`): one JSON line ``{"query_id", "query"?, "positive_ids", "negative_ids"}``
per query.

References:
    Xiong et al., "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval"
    (ANCE), ICLR 2021. Gao et al., "Tevatron: An Efficient and Flexible Toolkit for Dense Retrieval", 2022.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.runs import sorted_hits

logger = logging.getLogger(__name__)


def mine_hard_negatives(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    depth: int = 100,
    skip_top: int = 0,
    num_negatives: int | None = None,
    min_relevance: int = 1,
    queries: Mapping[str, str] | None = None,
) -> Iterator[dict]:
    """Yield one training group per query of ``qrels`` that ``run`` ranks, in qrels order.

    Per query: the run's hits in :func:`dualenc.io.runs.sorted_hits` order (score descending, then doc id),
    cut to the top ``depth``; the first ``skip_top`` of those are dropped (they may be unjudged positives);
    then every document judged with grade >= ``min_relevance`` (a positive) is dropped. Documents judged
    below ``min_relevance`` are judged non-relevant and stay negatives. At most ``num_negatives`` remain,
    best first.

    Queries without a positive are skipped; so are qrels queries the run lacks. Both are counted in a log line
    once the iterator is exhausted. A group may have no negatives (all top documents were positives): it still
    serves in-batch training and is counted too.

    Args:
        run: ``{query_id: {doc_id: score}}``.
        qrels: ``{query_id: {doc_id: grade}}`` (as :func:`dualenc.io.qrels.read_qrels` returns).
        depth: how many top hits to consider (>= 1).
        skip_top: how many of the top hits to drop first (0 <= skip_top < depth).
        num_negatives: keep at most this many negatives (>= 0); ``None`` keeps all.
        min_relevance: the smallest grade that counts as a positive.
        queries: ``{query_id: text}``; when given each group also carries ``"query"``.

    Returns:
        An iterator of ``{"query_id", "query"?, "positive_ids", "negative_ids"}``.

    Raises:
        InputError: a bad ``depth`` / ``skip_top`` / ``num_negatives``, or a query missing from ``queries``.
    """
    if depth < 1:
        raise InputError(f"depth must be >= 1, got {depth}")
    if not 0 <= skip_top < depth:
        raise InputError(f"skip_top must be in [0, depth={depth}), got {skip_top}")
    if num_negatives is not None and num_negatives < 0:
        raise InputError(f"num_negatives must be >= 0 or None, got {num_negatives}")
    return _mine(run, qrels, depth, skip_top, num_negatives, min_relevance, queries)


def _mine(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    depth: int,
    skip_top: int,
    num_negatives: int | None,
    min_relevance: int,
    queries: Mapping[str, str] | None,
) -> Iterator[dict]:
    """The generator behind :func:`mine_hard_negatives` (split off so bad arguments fail at the call)."""
    counts = {"groups": 0, "not_in_run": 0, "no_positive": 0, "no_negative": 0}
    for query_id, judged in qrels.items():
        if query_id not in run:
            counts["not_in_run"] += 1
            continue
        positive_ids = [doc_id for doc_id, grade in judged.items() if grade >= min_relevance]
        if not positive_ids:
            counts["no_positive"] += 1
            continue
        ranked = [doc_id for doc_id, _ in sorted_hits(run[query_id])[:depth]][skip_top:]
        negative_ids = [doc_id for doc_id in ranked if judged.get(doc_id, min_relevance - 1) < min_relevance]
        negative_ids = negative_ids[:num_negatives] if num_negatives is not None else negative_ids
        counts["groups"] += 1
        counts["no_negative"] += not negative_ids
        group: dict = {"query_id": query_id}
        if queries is not None:
            if query_id not in queries:
                raise InputError(f"query id {query_id!r} of the qrels has no text in the queries")
            group["query"] = queries[query_id]
        yield {**group, "positive_ids": positive_ids, "negative_ids": negative_ids}
    logger.info(
        "mined %d query groups (%d with no negative left); skipped %d qrels queries absent from the run "
        "and %d with no judgment >= %d",
        counts["groups"],
        counts["no_negative"],
        counts["not_in_run"],
        counts["no_positive"],
        min_relevance,
    )


def as_tevatron(groups: Iterable[dict], passages: Mapping[str, tuple[str, str]]) -> Iterator[dict]:
    """Mined id groups as Tevatron's text training JSONL (``train_format: tevatron``).

    Args:
        groups: dicts such as :func:`mine_hard_negatives` yields, each with its ``"query"`` text.
        passages: ``{doc_id: (title, text)}`` of the collection the run searched.

    Yields:
        ``{"query_id", "query", "positive_passages": [{"docid", "title", "text"}, ...],
        "negative_passages": [...]}``.

    Raises:
        InputError: a group without query text, or a document id missing from ``passages``.
    """

    def passage(doc_id: str) -> dict:
        if doc_id not in passages:
            raise InputError(f"document id {doc_id!r} of the run or qrels is not in the collection")
        title, text = passages[doc_id]
        return {"docid": doc_id, "title": title, "text": text}

    for group in groups:
        if "query" not in group:
            raise InputError(f"query {group['query_id']!r} has no text: Tevatron's format needs the topics")
        yield {
            "query_id": group["query_id"],
            "query": group["query"],
            "positive_passages": [passage(d) for d in group["positive_ids"]],
            "negative_passages": [passage(d) for d in group["negative_ids"]],
        }


def write_groups(groups: Iterable[dict], path: str | os.PathLike) -> int:
    """Write ``groups`` as JSON lines, atomically (a crash leaves the old file or none).

    Args:
        groups: dicts such as :func:`mine_hard_negatives` yields.
        path: output ``.jsonl`` file.

    Returns:
        The number of lines written.
    """
    num_lines = 0

    def lines() -> Iterator[str]:
        nonlocal num_lines
        for group in groups:
            num_lines += 1
            yield json.dumps(group, ensure_ascii=False)

    atomic.write_lines(path, lines())
    logger.info("wrote %d query groups to %s", num_lines, path)
    return num_lines
