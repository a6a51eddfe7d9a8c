"""Search with query vectors: a FAISS index directory, or an embeddings directory searched exactly with torch.

Both return a run in the tie order of ``dualenc.retrieval.topk`` (score desc, then doc id asc). faiss is
imported only when a FAISS index is searched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from dualenc.errors import InputError
from dualenc.io.atomic import readable_dir
from dualenc.io.embeddings import META_FILE, load_embeddings, read_meta
from dualenc.io.runs import Run, run_from_search
from dualenc.retrieval.index import search_shards
from dualenc.retrieval.index_dir import INDEX_META_FILE, load_index, read_index_meta
from dualenc.retrieval.topk import exact_search_torch


def index_kind(path: str | os.PathLike) -> str:
    """``"faiss"`` for a ``dualenc index`` directory, ``"embeddings"`` for a ``dualenc encode`` directory."""
    path = readable_dir(path)
    if (path / INDEX_META_FILE).exists():
        return "faiss"
    if (path / META_FILE).exists():
        return "embeddings"
    raise InputError(
        f"neither an index ({INDEX_META_FILE}) nor an embeddings directory ({META_FILE})", path=path
    )


def search_vectors(
    query_ids: Sequence[str],
    query_emb: np.ndarray,
    index_path: str | os.PathLike,
    *,
    k: int,
    device: str = "cpu",
    search_params: str | None = None,
    query_meta: dict | None = None,
) -> Run:
    """Top-``k`` documents for each query.

    Args:
        query_ids: ids of the queries, in row order of ``query_emb``.
        query_emb: (Q, D) float32 query vectors.
        index_path: a FAISS index directory (any factory; ANN parameters via ``search_params``) or an
            embeddings directory (exact inner-product search with torch, on ``device``; needs no faiss).
        k: hits per query.
        device: torch device for exact search ("cuda" uses the GPU without faiss-gpu).
        search_params: FAISS ParameterSpace string such as ``"nprobe=32"`` or ``"efSearch=256"``.
        query_meta: ``meta.json`` of the query embeddings directory, when the queries come from one: a
            ``model_fingerprint`` other than the one the documents were encoded with is an InputError.

    Returns:
        the run (qid -> {docid: score}).
    """
    if len(query_ids) != query_emb.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {query_emb.shape[0]} vectors")
    kind = index_kind(index_path)
    if kind == "faiss":  # what the index was built from: dim, model fingerprint (dualenc index records them)
        index_meta = read_index_meta(index_path)
        doc_meta = {**index_meta.get("embeddings_meta", {}), "dim": index_meta["dim"]}
    else:
        doc_meta = read_meta(index_path)
    _check_dim(query_emb, doc_meta["dim"], index_path)
    _check_same_model(query_meta, doc_meta, index_path)
    if kind == "faiss":
        shards = load_index(index_path)
        scores, doc_ids = search_shards(shards, query_emb, k, params=search_params)
        return {
            qid: {doc: float(s) for doc, s in zip(docs, row, strict=False)}
            for qid, docs, row in zip(query_ids, doc_ids, scores, strict=True)
        }
    if search_params:
        raise InputError(
            f"search parameters {search_params!r} need a FAISS index; {index_path} holds raw embeddings"
        )
    shards = load_embeddings(index_path)
    all_ids = [doc_id for shard in shards for doc_id in shard.ids]
    scores, indices = exact_search_torch(
        torch.from_numpy(np.ascontiguousarray(query_emb)),
        [s.emb for s in shards],
        k,
        device=device,
        doc_ids=all_ids,
    )
    return run_from_search(query_ids, all_ids, scores, indices)


def _check_same_model(query_meta: dict | None, doc_meta: dict, index_path) -> None:
    """Queries and documents must come from the same model weights, where both record a fingerprint."""
    query_fp = (query_meta or {}).get("model_fingerprint")
    doc_fp = doc_meta.get("model_fingerprint")
    if query_fp and doc_fp and query_fp != doc_fp:
        raise InputError(
            f"the query embeddings come from model {query_meta.get('model')!r} (fingerprint {query_fp}) but "
            f"the documents were encoded with {doc_meta.get('model')!r} (fingerprint {doc_fp}); encode the "
            "queries with the model that encoded the documents",
            path=index_path,
        )


def _check_dim(query_emb: np.ndarray, dim: int | None, index_path) -> None:
    if dim is not None and query_emb.shape[1] != dim:
        raise InputError(
            f"query vectors have dim {query_emb.shape[1]} but the index has dim {dim}", path=index_path
        )
