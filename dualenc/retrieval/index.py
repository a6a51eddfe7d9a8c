"""FAISS indexes over embedding shards (inner product): build in blocks, save/load, search with ResultHeap.

Index directory layout::

    index_dir/
      index_meta.json               {"factory", "dim", "metric", "num_shards", "count", "shard_counts", ...}
      index.00000-of-00001.faiss    faiss.write_index output
      docids.00000-of-00001.txt     the doc id of every row of that index, one per line

faiss is imported inside the functions that need it. Tie order (score desc, then doc id asc) and the
faiss-free exact search live in ``dualenc.retrieval.topk``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.embeddings import load_embeddings, read_ids, read_meta, shard_name, shard_paths
from dualenc.retrieval.topk import as_shards, check_search_args, iter_blocks, topk_with_ties

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

META_FILE = "index_meta.json"


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
    try:
        cpu_index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InputError(f"bad faiss factory string {factory!r}: {_faiss_reason(err)}") from None
    index = _to_gpu(faiss, cpu_index, use_gpu)
    if not index.is_trained:
        sample = _sample_rows(shards, min(train_size, total), seed, sources)  # (T, D)
        logger.info("training %r on %d of %d vectors", factory, sample.shape[0], total)
        index.train(sample)
    with tqdm(total=total, unit="vec", desc=f"add {factory}", disable=not progress) as bar:
        for p, start, block in iter_blocks(shards, add_batch_size):
            block = np.ascontiguousarray(block, dtype=np.float32)  # (B, D)
            _check_finite(block, p, np.arange(start, start + block.shape[0]), sources)
            index.add(block)
            bar.update(block.shape[0])
    return cpu_index if index is cpu_index else faiss.index_gpu_to_cpu(index)


def set_search_params(index: faiss.Index, params: str | None) -> None:
    """Set search-time parameters, e.g. ``"nprobe=32"`` (IVF) or ``"efSearch=128"`` (HNSW), comma separated."""
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


def search(
    shards: Sequence[IndexShard],
    queries: np.ndarray,
    k: int,
    *,
    params: str | None = None,
    batch_size: int = 4096,
) -> tuple[np.ndarray, list[list[str]]]:
    """Top-``k`` inner-product search over index shards, merged with ``faiss.ResultHeap``.

    Args:
        shards: from ``load_index`` (or built in memory); their rows are numbered globally in order.
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


# ----------------------------------------------------------------------------------------------- index files


def _shard_files(index_dir: Path, shard: int, num_shards: int) -> tuple[Path, Path]:
    name = shard_name(shard, num_shards)
    return index_dir / f"index.{name}.faiss", index_dir / f"docids.{name}.txt"


def save_index(
    index_dir: str | os.PathLike,
    index: faiss.Index,
    doc_ids: Sequence[str],
    *,
    meta: dict | None = None,
    shard: int = 0,
    num_shards: int = 1,
) -> None:
    """Write one index shard, its doc ids and ``index_meta.json`` (each file atomically; no pickles).

    Args:
        index_dir: output directory (created if needed).
        index: an inner-product index with ``len(doc_ids)`` rows.
        doc_ids: id of each index row.
        meta: extra JSON-able facts to record (e.g. ``{"factory": "HNSW32"}``).
        shard, num_shards: which shard this is.
    """
    import faiss

    if not 0 <= shard < num_shards:
        raise InputError(f"shard {shard} is not in [0, {num_shards})")
    if index.ntotal != len(doc_ids):
        raise InputError(f"{len(doc_ids)} doc ids for an index with {index.ntotal} vectors")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(f"only inner-product indexes are supported, got metric {index.metric_type}")
    index_dir = Path(index_dir)
    index_path, ids_path = _shard_files(index_dir, shard, num_shards)
    with atomic.atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    atomic.write_lines(ids_path, doc_ids)
    old = json.loads((index_dir / META_FILE).read_text()) if (index_dir / META_FILE).exists() else {}
    same_layout = old.get("num_shards") == num_shards and old.get("dim") == index.d
    counts = dict(old["shard_counts"]) if same_layout else {}
    counts[shard_name(shard, num_shards)] = int(index.ntotal)
    info = {"factory": None, **(meta or {}), "dim": int(index.d), "metric": "inner_product"}
    info.update(num_shards=num_shards, shard_counts=counts, faiss_version=faiss.__version__)
    info["count"] = sum(counts.values()) if len(counts) == num_shards else None
    atomic.write_json(index_dir / META_FILE, info)


def load_index(index_dir: str | os.PathLike) -> list[IndexShard]:
    """Read every shard listed in ``index_meta.json``, checking each index against its doc ids."""
    import faiss

    index_dir = Path(index_dir)
    meta_path = index_dir / META_FILE
    if not meta_path.exists():
        raise InputError(
            f"not an index directory (no {META_FILE}); run `dualenc index` first", path=index_dir
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    shards = []
    for p in range(meta["num_shards"]):
        index_path, ids_path = _shard_files(index_dir, p, meta["num_shards"])
        for path in (index_path, ids_path):
            if not path.exists():
                raise InputError("missing index shard file (indexing did not finish?)", path=path)
        index, doc_ids = faiss.read_index(str(index_path)), read_ids(ids_path)
        if index.ntotal != len(doc_ids):
            raise InputError(
                f"{len(doc_ids)} doc ids but {index_path.name} holds {index.ntotal}", path=ids_path
            )
        if index.d != meta["dim"]:
            raise InputError(f"index dim {index.d} != dim {meta['dim']} in {META_FILE}", path=index_path)
        shards.append(IndexShard(index=index, doc_ids=doc_ids))
    return shards


def index_from_embeddings(
    emb_dir: str | os.PathLike,
    index_dir: str | os.PathLike,
    factory: str = "Flat",
    *,
    per_shard: bool = False,
    **build_kwargs: Any,
) -> None:
    """Index an embeddings directory (``dualenc.io.embeddings`` layout) into ``index_dir``.

    Args:
        emb_dir: output of ``dualenc encode``.
        index_dir: where the index files go.
        factory: faiss factory string.
        per_shard: one index per embeddings shard (searched with the ResultHeap merge) instead of one
            index over all of them.
        **build_kwargs: passed to ``build_index``.
    """
    emb_meta = read_meta(emb_dir)
    shards = load_embeddings(emb_dir)
    sources = [shard_paths(emb_dir, p, len(shards))[0] for p in range(len(shards))]
    groups = [[p] for p in range(len(shards))] if per_shard else [list(range(len(shards)))]
    meta = {"factory": factory, "embeddings": str(emb_dir), "embeddings_meta": emb_meta}
    for g, members in enumerate(groups):
        index = build_index(
            [shards[p].emb for p in members], factory, sources=[sources[p] for p in members], **build_kwargs
        )
        doc_ids = [doc_id for p in members for doc_id in shards[p].ids]
        save_index(index_dir, index, doc_ids, meta=meta, shard=g, num_shards=len(groups))
        logger.info("indexed %d vectors of %s into shard %d/%d", len(doc_ids), emb_dir, g + 1, len(groups))
