"""A small dev set held in memory and scored during training: encode, exact search, ir-measures."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from dualenc.evaluation.measures import evaluate
from dualenc.io.qrels import read_qrels
from dualenc.io.readers import doc_texts, read_collection, read_queries
from dualenc.io.runs import run_from_search
from dualenc.model.encoder import DualEncoder
from dualenc.retrieval.encode import encode_texts
from dualenc.retrieval.topk import exact_search_torch

logger = logging.getLogger(__name__)


@dataclass
class DevSet:
    """A dev collection, topics and qrels held in memory for evaluation during training."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    hits: int = 100

    @torch.no_grad()
    def evaluate(self, model: DualEncoder, measure: str, *, batch_size: int, device) -> dict[str, float]:
        """Encode, search exactly, score with ir-measures; leaves the model in eval mode."""
        model.eval()
        docs = encode_texts(model, self.doc_texts, kind="doc", batch_size=batch_size, device=device)  # (N, D)
        queries = encode_texts(model, self.query_texts, kind="query", batch_size=batch_size, device=device)
        scores, rows = exact_search_torch(
            queries, docs, min(self.hits, len(docs)), device=str(device), doc_ids=self.doc_ids
        )
        run = run_from_search(self.query_ids, self.doc_ids, scores, rows)
        return evaluate(self.qrels, run, measure)


def load_dev_set(
    corpus_file: str | os.PathLike,
    topics_file: str | os.PathLike,
    qrels_file: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    columns: str | None = None,
) -> DevSet:
    """The judged topics of a dev collection, with every document's text (title and body joined);
    ``columns`` as :func:`dualenc.io.readers.read_collection` takes it."""
    corpus = read_collection(corpus_file, cache_dir=cache_dir, columns=columns)
    topics = read_queries(topics_file, cache_dir=cache_dir)
    qrels = read_qrels(qrels_file)
    judged = [qid for qid in topics["id"] if qid in qrels]
    keep = set(judged)
    rows = [i for i, qid in enumerate(topics["id"]) if qid in keep]
    logger.info("dev set: %d docs, %d judged queries of %d", len(corpus), len(rows), len(topics))
    return DevSet(list(corpus["id"]), doc_texts(corpus), judged, [topics["text"][i] for i in rows], qrels)
