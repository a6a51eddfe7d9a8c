"""The index directory: FAISS index shards and their doc ids on disk; index an embeddings directory into one.

::

    index_dir/
      index_meta.json               {"factory", "dim", "metric", "num_shards", "count", "shard_counts", ...}
      index.00000-of-00001.faiss    faiss.write_index output
      docids.00000-of-00001.txt     the doc id of every row of that index, one per line

faiss is imported inside the functions that need it. Each file is written atomically; no pickles.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualenc.errors import InputError
from dualenc.io.atomic import atomic_path, write_json, write_lines
from dualenc.io.embeddings import load_embeddings, read_ids, read_meta, shard_name, shard_paths
from dualenc.retrieval.index import IndexShard, build_index

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

INDEX_META_FILE = "index_meta.json"


def _shard_files(index_dir: Path, shard: int, num_shards: int) -> tuple[Path, Path]:
    """Paths of the index file and the doc ids file of one shard."""
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
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    write_lines(ids_path, doc_ids)
    meta_path = index_dir / INDEX_META_FILE
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    same_layout = old.get("num_shards") == num_shards and old.get("dim") == index.d
    counts = dict(old["shard_counts"]) if same_layout else {}
    counts[shard_name(shard, num_shards)] = int(index.ntotal)
    info = {"factory": None, **(meta or {}), "dim": int(index.d), "metric": "inner_product"}
    info.update(num_shards=num_shards, shard_counts=counts, faiss_version=faiss.__version__)
    info["count"] = sum(counts.values()) if len(counts) == num_shards else None
    write_json(meta_path, info)


def load_index(index_dir: str | os.PathLike) -> list[IndexShard]:
    """Read every shard listed in ``index_meta.json``, checking each index against its doc ids."""
    import faiss

    index_dir = Path(index_dir)
    meta_path = index_dir / INDEX_META_FILE
    if not meta_path.exists():
        raise InputError(
            f"not an index directory (no {INDEX_META_FILE}); run `dualenc index` first", path=index_dir
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
            raise InputError(
                f"index dim {index.d} != dim {meta['dim']} in {INDEX_META_FILE}", path=index_path
            )
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
