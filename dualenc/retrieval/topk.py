"""Exact inner-product top-k in plain torch and the deterministic tie-break shared by every search.

Nothing here imports faiss, so ``exact_search_torch`` works on machines without it (e.g. a GPU box with
only torch); ``dualenc.retrieval.index`` uses the tie-break and the corpus helpers for its faiss searches.

Tie order: every search returns hits by score descending, then doc id ascending (string order), so results
do not depend on shard layout, BLAS or faiss's heap order. faiss and ``torch.topk`` cut ties at the k-th
score arbitrarily, so each search fetches ``k + TIE_MARGIN`` candidates, re-sorts them with the tie-break,
and re-fetches with twice as many for queries whose k-th score is tied with the last candidate fetched.
Limitation: the re-fetch stops at ``MAX_FETCH_FACTOR * (k + TIE_MARGIN)`` candidates (a warning is
logged), so ties deeper than that (e.g. thousands of identical vectors) may be broken arbitrarily.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from dualenc.errors import InputError

logger = logging.getLogger(__name__)

TIE_MARGIN = 16  # extra candidates fetched per query so ties at the k-th score can be re-sorted
MAX_FETCH_FACTOR = 16  # re-fetching on deep ties stops at this many times k + TIE_MARGIN
Fetch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (query rows, k) -> (scores, rows)


# ----------------------------------------------------------------------------------------- tie-break helpers


def sort_candidates(scores: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's candidates by score descending, then ``keys`` ascending; rows ``-1`` go last.

    Shapes:
        scores, rows, keys: (Q, m) -> sorted scores (Q, m) float32 (``-inf`` for ``-1`` rows), rows (Q, m)
    """
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)  # (Q, m)
    order = np.lexsort((keys, -scores), axis=-1)  # (Q, m)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(rows, order, -1)


def topk_with_ties(
    fetch: Fetch, num_queries: int, k: int, total: int, key_of: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows per query in the deterministic order (score desc, then ``key_of(row)`` asc).

    Args:
        fetch: ``fetch(query_rows, m)`` returns some top-``m`` ``(scores, rows)`` for those queries, in any
            order and with any tie order (rows ``-1`` = no result).
        num_queries: number of queries.
        k: hits wanted per query.
        total: number of rows that can be returned (fetching more is pointless).
        key_of: maps rows (any shape) to their tie-break keys (doc ids or the rows themselves).

    Returns:
        scores (Q, k) float32 (``-inf`` padding) and rows (Q, k) int64 (``-1`` padding).
    """
    out_scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
    out_rows = np.full((num_queries, k), -1, dtype=np.int64)
    cap = min(total, MAX_FETCH_FACTOR * (k + TIE_MARGIN))
    num_fetch = min(k + TIE_MARGIN, total)
    pending = np.arange(num_queries)
    while pending.size:
        scores, rows = fetch(pending, num_fetch)  # (P, m), (P, m)
        rows = np.asarray(rows, dtype=np.int64)
        scores, rows = sort_candidates(scores, rows, key_of(np.maximum(rows, 0)))
        kept = min(k, rows.shape[1])
        # The k-th hit is tied with the last candidate: tied rows may have been cut, fetch more.
        cut = (scores[:, kept - 1] == scores[:, -1]) & (rows[:, kept - 1] >= 0) & (num_fetch < total)
        if cut.any() and num_fetch >= cap:
            logger.warning(
                "%d queries have ties deeper than %d candidates; tie order not guaranteed", cut.sum(), cap
            )
            cut[:] = False
        done = pending[~cut]
        out_scores[done, :kept], out_rows[done, :kept] = scores[~cut, :kept], rows[~cut, :kept]
        pending, num_fetch = pending[cut], min(2 * num_fetch, cap)
    return out_scores, out_rows


# ------------------------------------------------------------------------------------------- corpus helpers


def as_shards(embeddings: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """The corpus as a list of 2-D shards with one dim (shards are never concatenated in memory)."""
    shards = [embeddings] if isinstance(embeddings, np.ndarray) else list(embeddings)
    if not shards or sum(s.shape[0] for s in shards) == 0:
        raise InputError("no embeddings to index or search")
    for p, emb in enumerate(shards):
        if emb.ndim != 2:
            raise InputError(f"embedding shard {p} has shape {emb.shape}; expected (N, D)")
        if emb.shape[1] != shards[0].shape[1]:
            raise InputError(
                f"embedding shard {p} has dim {emb.shape[1]} but shard 0 has dim {shards[0].shape[1]}"
            )
    return shards


def iter_blocks(shards: list[np.ndarray], block_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(shard, local start row, block)`` in corpus order; blocks never cross shard boundaries."""
    for p, emb in enumerate(shards):
        for start in range(0, emb.shape[0], block_size):
            yield p, start, emb[start : start + block_size]


def check_search_args(queries: np.ndarray, dim: int, k: int) -> None:
    """Raise ``InputError`` unless ``queries`` is a finite (Q, ``dim``) array and ``k >= 1``."""
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InputError(f"queries have shape {queries.shape}; the index expects (Q, {dim})")
    if not np.isfinite(queries).all():
        raise InputError(f"query row {int(np.argmax(~np.isfinite(queries).all(axis=1)))} contains NaN or inf")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")


# ------------------------------------------------------------------------------------ exact search in torch


def exact_search_torch(
    queries: torch.Tensor | np.ndarray,
    embeddings: np.ndarray | Sequence[np.ndarray],
    k: int,
    *,
    device: str = "cpu",
    block_size: int = 262_144,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1024,
    doc_ids: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` by matmul + ``topk`` over corpus blocks (no faiss needed).

    Each corpus block is moved to ``device`` once and scored against all queries (``batch_size`` at a
    time); a running top-k per query is merged block by block.

    Args:
        queries: query embeddings.
        embeddings: the corpus, one array or several shards (e.g. memmaps), concatenated logically.
        k: hits per query; columns beyond the corpus size are padded (score ``-inf``, row ``-1``).
        device: torch device for the matmuls.
        block_size: corpus rows per block.
        dtype: matmul dtype (scores are compared in float32).
        batch_size: queries scored together against one block.
        doc_ids: ids of the corpus rows; ties are broken by doc id when given, else by row.

    Returns:
        scores (Q, k) float32 and global row indices (Q, k) int64, score desc then tie key asc.
    """
    shards = as_shards(embeddings)
    total = sum(emb.shape[0] for emb in shards)
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().float().cpu().numpy()
    check_search_args(queries, shards[0].shape[1], k)
    query = torch.from_numpy(np.asarray(queries)).to(device=device, dtype=dtype)  # (Q, D)
    keys = np.asarray(doc_ids) if doc_ids is not None else None

    def fetch(query_rows: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
        sub = query[torch.as_tensor(query_rows, device=query.device)]  # (P, D)
        best_scores = torch.empty((len(query_rows), 0), device=query.device)  # (P, <=num)
        best_rows = torch.empty((len(query_rows), 0), dtype=torch.long, device=query.device)
        offsets = np.cumsum([0] + [emb.shape[0] for emb in shards])
        for p, start, block in iter_blocks(shards, block_size):
            doc = torch.from_numpy(np.array(block)).to(device=query.device, dtype=dtype)  # (B, D)
            new_s, new_r = [], []
            for q0 in range(0, len(query_rows), batch_size):
                scores = (sub[q0 : q0 + batch_size] @ doc.T).float()  # (b, B)
                s, r = scores.topk(min(num, doc.shape[0]), dim=1)  # (b, m)
                new_s.append(s)
                new_r.append(r + int(offsets[p]) + start)
            all_s = torch.cat([best_scores, torch.cat(new_s)], dim=1)  # (P, <=2 num)
            all_r = torch.cat([best_rows, torch.cat(new_r)], dim=1)
            best_scores, top = all_s.topk(min(num, all_s.shape[1]), dim=1)  # (P, <=num)
            best_rows = all_r.gather(1, top)
        return best_scores.cpu().numpy(), best_rows.cpu().numpy()

    return topk_with_ties(
        fetch, query.shape[0], k, total, (lambda r: keys[r]) if keys is not None else (lambda r: r)
    )
