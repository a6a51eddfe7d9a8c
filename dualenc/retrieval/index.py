"""FAISS indexes in memory (inner product): build in blocks, set search parameters, search shards merged
with ``faiss.ResultHeap``.

faiss is imported inside the functions that need it. Tie order (score desc, then doc id asc) and the
faiss-free exact search live in ``dualenc.retrieval.topk``; index files on disk in
``dualenc.retrieval.index_dir``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dualenc.errors import InputError
from dualenc.retrieval.topk import as_shards, check_search_args, iter_blocks, topk_with_ties

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexShard:
    """One searchable shard: row ``i`` of ``index`` is document ``doc_ids[i]``."""

    index: faiss.Index
    doc_ids: list[str]


# ------------------------------------------------------------------------------------------- corpus helpers


def _check_finite(block: np.ndarray, shard: int, local_rows: np.ndarray, sources: Sequence | None) -> None:
    bad = ~np.isfinite(block).all(axis=1)  # (B,)
    if bad.any():
        row = int(local_rows[int(np.argmax(bad))])
        raise InputError(
            f"embedding row {row} (0-based) of shard {shard} contains NaN or inf",
            path=None if sources is None else sources[shard],
        )


def _sample_rows(shards: list[np.ndarray], size: int, seed: int, sources: Sequence | None) -> np.ndarray:
    """A seeded uniform sample of ``size`` corpus rows as float32, read shard by shard (memmap friendly)."""
    offsets = np.cumsum([0] + [emb.shape[0] for emb in shards])
    rows = np.sort(np.random.default_rng(seed).choice(int(offsets[-1]), size=size, replace=False))
    parts = []
    for p, emb in enumerate(shards):
        local = rows[(rows >= offsets[p]) & (rows < offsets[p + 1])] - offsets[p]
        part = np.asarray(emb[local], dtype=np.float32)  # (n_p, D)
        _check_finite(part, p, local, sources)
        parts.append(part)
    return np.ascontiguousarray(np.concatenate(parts))  # (size, D)


# --------------------------------------------------------------------------------------------- faiss indexes


def _faiss_reason(err: Exception) -> str:
    """faiss's own message without the C++ location prefix."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(err).strip().splitlines()[0])


def _to_gpu(faiss: Any, index: faiss.Index, use_gpu: bool | None) -> faiss.Index:
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu and not has_gpu:
        raise InputError("use_gpu=True but faiss has no GPU support or sees no GPU")
    if not (has_gpu if use_gpu is None else use_gpu):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as err:  # not every index type has a GPU version (e.g. HNSW)
        logger.warning("faiss cannot build this index on GPU (%s); building on CPU", _faiss_reason(err))
        return index


def _make_index(faiss: Any, dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InputError(f"bad faiss factory string {factory!r}: {_faiss_reason(err)}") from None


def check_trainable(factory: str, dim: int, num_vectors: int, train_size: int = 262_144) -> None:
    """InputError, with a hint, when ``factory`` needs more training vectors than :func:`build_index` samples.

    k-means needs at least as many points as centroids: ``nlist`` for an IVF index (``IVF4096``), ``2**nbits``
    (256 by default) per sub-quantizer for a product quantizer (``PQ64``, ``PQ64x4``). faiss recommends 39
    points per centroid. Cheap: it builds the empty index only, so callers run it before writing anything.

    Args:
        factory: ``faiss.index_factory`` string (a bad one is an InputError too).
        dim: vector dimension.
        num_vectors: vectors in the corpus.
        train_size: at most this many are sampled for training (``build_index``'s ``train_size``).
    """
    import faiss

    index = _make_index(faiss, dim, factory)
    if index.is_trained:
        return
    sample = min(train_size, num_vectors)
    have, more = f"the embeddings have {num_vectors}", ""
    if sample < num_vectors:
        have, more = f"{have} and train_size samples {sample} of them", " (or a larger train_size)"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and sample < ivf.nlist:
        n = ivf.nlist
        raise InputError(
            f"{factory!r}: IVF{n} needs >= {n} training vectors ({39 * n} = 39 x nlist recommended), {have}: "
            f"use a smaller nlist{more} or Flat/HNSW"
        )
    for match in re.finditer(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory):
        m, centroids = match.group(1), 2 ** int(match.group(2) or 8)
        if sample < centroids:
            raise InputError(
                f"{factory!r}: PQ{m} with {centroids} centroids per sub-quantizer needs >= {centroids} "
                f"training vectors ({39 * centroids} recommended), {have}: "
                f"use fewer bits (e.g. PQ{m}x4){more}, Flat or HNSW"
            )


def build_index(
    embeddings: np.ndarray | Sequence[np.ndarray],
    factory: str = "Flat",
    *,
    train_size: int = 262_144,
    add_batch_size: int = 65_536,
    seed: int = 0,
    use_gpu: bool | None = None,
    progress: bool = False,
    sources: Sequence[str | os.PathLike] | None = None,
) -> faiss.Index:
    """Build an inner-product faiss index: train on a seeded sample if needed, then add in blocks.

    Args:
        embeddings: the corpus, one array or several shards (memmaps are read block by block).
        factory: ``faiss.index_factory`` string, e.g. ``"Flat"``, ``"IVF4096,Flat"``, ``"HNSW32"``,
            ``"IVF4096,PQ64"``.
        train_size: at most this many uniformly sampled rows train the index (IVF centroids, PQ codebooks).
        add_batch_size: rows converted to float32 and added at a time.
        seed: seed of the training sample.
        use_gpu: build on GPU faiss; ``None`` = when faiss has GPU support and sees a GPU.
        progress: show a tqdm bar while adding.
        sources: file of each shard, named in error messages.

    Returns:
        A CPU index holding every row, in corpus order.
    """
    import faiss

    shards = as_shards(embeddings)
    dim, total = shards[0].shape[1], sum(emb.shape[0] for emb in shards)
    check_trainable(factory, dim, total, train_size)
    cpu_index = _make_index(faiss, dim, factory)
    index = _to_gpu(faiss, cpu_index, use_gpu)
    if not index.is_trained:
        sample = _sample_rows(shards, min(train_size, total), seed, sources)  # (T, D)
        logger.info("training %r on %d of %d vectors", factory, sample.shape[0], total)
        try:
            index.train(sample)
        except RuntimeError as err:  # what check_trainable does not foresee
            raise InputError(
                f"cannot train {factory!r} on {sample.shape[0]} vectors: {_faiss_reason(err)}"
            ) from None
    with tqdm(total=total, unit="vec", desc=f"add {factory}", disable=not progress) as bar:
        for p, start, block in iter_blocks(shards, add_batch_size):
            block = np.ascontiguousarray(block, dtype=np.float32)  # (B, D)
            _check_finite(block, p, np.arange(start, start + block.shape[0]), sources)
            index.add(block)
            bar.update(block.shape[0])
    return cpu_index if index is cpu_index else faiss.index_gpu_to_cpu(index)


def set_search_params(index: faiss.Index, params: str | None) -> None:
    """Set search-time parameters, comma separated: e.g. ``"nprobe=32"`` (IVF), ``"efSearch=128"`` (HNSW)."""
    if not params:
        return
    import faiss

    parts = []
    for part in params.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not (name and sep and re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", value)):
            raise InputError(f"bad search parameter {part.strip()!r} in {params!r}; expected name=number")
        parts.append(f"{name}={value}")
    try:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(parts))
    except RuntimeError as err:
        raise InputError(f"cannot set {params!r} on a {type(index).__name__}: {_faiss_reason(err)}") from None


def search_shards(
    shards: Sequence[IndexShard],
    queries: np.ndarray,
    k: int,
    *,
    params: str | None = None,
    batch_size: int = 4096,
) -> tuple[np.ndarray, list[list[str]]]:
    """Top-``k`` inner-product search over index shards, merged with ``faiss.ResultHeap``.

    Args:
        shards: from ``dualenc.retrieval.index_dir.load_index`` (or built in memory); their rows are
            numbered globally, in order.
        queries: query embeddings.
        k: hits per query.
        params: search parameters for every shard (see ``set_search_params``).
        batch_size: queries searched at a time.

    Returns:
        scores (Q, k) float32 (``-inf`` where fewer than ``k`` hits) and the doc ids of each query's hits,
        score desc then doc id asc.
    """
    import faiss

    if not shards:
        raise InputError("no index shards to search")
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    check_search_args(queries, shards[0].index.d, k)
    for shard in shards:
        set_search_params(shard.index, params)
    all_ids = [doc_id for shard in shards for doc_id in shard.doc_ids]
    keys = np.asarray(all_ids)  # (N,) string tie-break keys
    offsets = np.cumsum([0] + [shard.index.ntotal for shard in shards])
    out_scores, out_ids = [], []
    for q0 in range(0, queries.shape[0], batch_size):
        batch = queries[q0 : q0 + batch_size]  # (b, D)

        def fetch(
            query_rows: np.ndarray, num: int, batch: np.ndarray = batch
        ) -> tuple[np.ndarray, np.ndarray]:
            heap = faiss.ResultHeap(len(query_rows), num, keep_max=True)
            for shard, offset in zip(shards, offsets, strict=False):
                if shard.index.ntotal:
                    scores, rows = shard.index.search(batch[query_rows], min(num, shard.index.ntotal))
                    heap.add_result(scores, np.where(rows >= 0, rows + offset, -1))
            heap.finalize()
            return heap.D, heap.I

        scores, rows = topk_with_ties(fetch, batch.shape[0], k, int(offsets[-1]), lambda r: keys[r])
        out_scores.append(scores)
        out_ids.extend([all_ids[i] for i in row if i >= 0] for row in rows.tolist())
    return np.concatenate(out_scores) if out_scores else np.zeros((0, k), np.float32), out_ids
