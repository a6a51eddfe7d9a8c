"""The index directory: FAISS index shards and their doc ids on disk; index an embeddings directory into one.

::

    index_dir/
      index_meta.json               {"factory", "dim", "metric", "num_shards", "count", "shard_counts",
                                     "files": {name: {"bytes", "sha256"}}, "embeddings_meta", ...}
      index.00000-of-00001.faiss    faiss.write_index output
      docids.00000-of-00001.txt     the doc id of every row of that index, one per line

:func:`index_from_embeddings` builds the whole directory in a temporary sibling under the directory's write
lock and swaps it in whole (:func:`dualenc.io.atomic.atomic_dir`): a build killed at any moment leaves the
old complete index or the new complete one. :func:`load_index` reads only what ``index_meta.json`` vouches
for: each file's size and SHA-256, each shard's row count, the dimension; anything else (files of two builds
mixed, a truncated file) is refused. faiss is imported inside the functions that need it; no pickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualenc.errors import InputError
from dualenc.io.atomic import atomic_dir, atomic_path, readable_dir, recover_dir, write_json, write_lines
from dualenc.io.embeddings import load_embeddings, read_meta, shard_name, shard_paths
from dualenc.io.lock import output_lock
from dualenc.io.provenance import dir_fingerprint
from dualenc.retrieval.index import IndexShard, build_index, check_trainable

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

INDEX_META_FILE = "index_meta.json"
_CHUNK = 1 << 20
_REBUILD = "the index files do not belong together (a mix of two builds?) or changed since; rebuild it"


def _shard_files(index_dir: Path, shard: int, num_shards: int) -> tuple[Path, Path]:
    """Paths of the index file and the doc ids file of one shard."""
    name = shard_name(shard, num_shards)
    return index_dir / f"index.{name}.faiss", index_dir / f"docids.{name}.txt"


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def save_index(
    index_dir: str | os.PathLike,
    index: faiss.Index,
    doc_ids: Sequence[str],
    *,
    meta: dict | None = None,
    shard: int = 0,
    num_shards: int = 1,
) -> None:
    """Write one index shard, its doc ids and ``index_meta.json`` into ``index_dir``, each file atomically.

    The files are written in place, one by one; to replace a whole index use :func:`index_from_embeddings`
    (or write into :func:`dualenc.io.atomic.atomic_dir`). ``index_meta.json`` records each file's size and
    SHA-256, which :func:`load_index` checks.

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
    same_layout = old.get("num_shards") == num_shards and old.get("dim") == index.d and "files" in old
    counts = dict(old["shard_counts"]) if same_layout else {}
    files = dict(old["files"]) if same_layout else {}
    counts[shard_name(shard, num_shards)] = int(index.ntotal)
    files.update({path.name: _file_record(path) for path in (index_path, ids_path)})
    info = {"factory": None, **(meta or {}), "dim": int(index.d), "metric": "inner_product"}
    info.update(num_shards=num_shards, shard_counts=counts, faiss_version=faiss.__version__)
    info["count"] = sum(counts.values()) if len(counts) == num_shards else None
    info["files"] = files
    write_json(meta_path, info)


def read_index_meta(index_dir: str | os.PathLike) -> dict:
    """``index_meta.json`` of an index directory (its moved-aside version if a swap was interrupted)."""
    meta_path = readable_dir(index_dir) / INDEX_META_FILE
    if not meta_path.exists():
        raise InputError(
            f"not an index directory (no {INDEX_META_FILE}); run `dualenc index` first", path=index_dir
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{INDEX_META_FILE} is not valid JSON ({err.msg})", path=meta_path) from None
    if "files" not in meta:
        raise InputError(
            "records no file sizes or checksums (written by an older dualenc); rebuild the index with "
            "`dualenc index`",
            path=meta_path,
        )
    return meta


def _check_file(path: Path, meta: dict, digest: str | None = None) -> None:
    """``path`` exists with the size (and, given ``digest``, the SHA-256) that ``index_meta.json`` records."""
    record = meta["files"].get(path.name)
    if not path.exists():
        raise InputError("missing index shard file (indexing did not finish?)", path=path)
    if record is None:
        raise InputError(f"not listed in {INDEX_META_FILE}: {_REBUILD}", path=path)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise InputError(
            f"{size} bytes but {INDEX_META_FILE} records {record['bytes']}: {_REBUILD}", path=path
        )
    if digest is not None and digest != record["sha256"]:
        raise InputError(f"SHA-256 differs from {INDEX_META_FILE}'s: {_REBUILD}", path=path)


def _read_faiss(path: Path) -> tuple[faiss.Index, str]:
    """The index and the SHA-256 of its file, both from one read of the file."""
    import faiss

    digest = hashlib.sha256()
    with open(path, "rb") as fh:

        def read(size: int) -> bytes:
            data = fh.read(size)
            digest.update(data)
            return data

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read, _CHUNK))
        except RuntimeError as err:
            raise InputError(f"faiss cannot read this index file: {_REBUILD}", path=path) from err
        while chunk := fh.read(_CHUNK):  # bytes faiss did not need still belong to the file
            digest.update(chunk)
    return index, digest.hexdigest()


def _read_ids(path: Path, meta: dict) -> list[str]:
    """The doc ids (as ``read_ids`` parses them), once the file's SHA-256 is the recorded one."""
    data = path.read_bytes()
    _check_file(path, meta, hashlib.sha256(data).hexdigest())
    lines = io.StringIO(data.decode("utf-8"), newline=None)
    return [line.rstrip("\n") for line in lines]


def load_index(index_dir: str | os.PathLike) -> list[IndexShard]:
    """Read every shard listed in ``index_meta.json``; InputError unless every file is the one it records.

    Checks each file's size and SHA-256, each shard's rows against its doc ids and ``shard_counts``, and the
    dimension. A directory whose replacement was interrupted is read from its moved-aside previous version
    (:func:`dualenc.io.atomic.readable_dir`).
    """
    folder = readable_dir(index_dir)
    meta = read_index_meta(folder)
    num_shards, counts = meta["num_shards"], meta["shard_counts"]
    shards = []
    try:
        for p in range(num_shards):
            index_path, ids_path = _shard_files(folder, p, num_shards)
            for path in (index_path, ids_path):
                _check_file(path, meta)
            doc_ids = _read_ids(ids_path, meta)
            index, index_digest = _read_faiss(index_path)
            _check_file(index_path, meta, index_digest)
            expected = counts.get(shard_name(p, num_shards))
            if not index.ntotal == len(doc_ids) == expected:
                raise InputError(
                    f"{len(doc_ids)} doc ids, {index.ntotal} vectors in {index_path.name}, {expected} in "
                    f"{INDEX_META_FILE}: {_REBUILD}",
                    path=ids_path,
                )
            if index.d != meta["dim"]:
                raise InputError(
                    f"index dim {index.d} != dim {meta['dim']} in {INDEX_META_FILE}", path=index_path
                )
            shards.append(IndexShard(index=index, doc_ids=doc_ids))
    except OSError as err:  # e.g. a writer swapped the directory while it was read
        raise InputError(
            f"cannot read the index ({err.strerror}): {_REBUILD}", path=err.filename or folder
        ) from None
    return shards


def index_from_embeddings(
    emb_dir: str | os.PathLike,
    index_dir: str | os.PathLike,
    factory: str = "Flat",
    *,
    per_shard: bool = False,
    train_size: int = 262_144,
    **build_kwargs: Any,
) -> None:
    """Index an embeddings directory (``dualenc.io.embeddings`` layout) into ``index_dir``, replaced whole.

    Bad input (a factory string faiss rejects, too few vectors to train it, an ``index_dir`` that holds
    something other than an index) is an InputError before anything is written. The build holds
    ``index_dir``'s write lock (:func:`dualenc.io.lock.output_lock`; a second writer is refused) and writes
    into a temporary sibling swapped in at the end (:func:`dualenc.io.atomic.atomic_dir`). ``index_meta.json``
    records the factory, the embeddings directory's ``meta.json`` (model fingerprint, source collection,
    kind, dim, count) and a fingerprint of its files.

    Args:
        emb_dir: output of ``dualenc encode``.
        index_dir: the index directory.
        factory: faiss factory string.
        per_shard: one index per embeddings shard (searched with the ResultHeap merge) instead of one
            index over all of them.
        train_size: at most this many sampled vectors train the index (see ``build_index``).
        **build_kwargs: passed to ``build_index``.
    """
    emb_meta = read_meta(emb_dir)
    shards = load_embeddings(emb_dir)
    sources = [shard_paths(emb_dir, p, len(shards))[0] for p in range(len(shards))]
    groups = [[p] for p in range(len(shards))] if per_shard else [list(range(len(shards)))]
    dim = int(shards[0].emb.shape[1])
    for members in groups:
        check_trainable(factory, dim, sum(len(shards[p].ids) for p in members), train_size)
    _check_replaceable(Path(index_dir))
    meta = {
        "factory": factory,
        "per_shard": per_shard,
        "embeddings": str(emb_dir),
        "embeddings_meta": emb_meta,
        "embeddings_fingerprint": dir_fingerprint(emb_dir),
    }
    with output_lock(index_dir):
        recover_dir(index_dir)
        with atomic_dir(index_dir) as tmp:
            for g, members in enumerate(groups):
                index = build_index(
                    [shards[p].emb for p in members],
                    factory,
                    train_size=train_size,
                    sources=[sources[p] for p in members],
                    **build_kwargs,
                )
                doc_ids = [doc_id for p in members for doc_id in shards[p].ids]
                save_index(tmp, index, doc_ids, meta=meta, shard=g, num_shards=len(groups))
                logger.info(
                    "indexed %d vectors of %s into shard %d/%d", len(doc_ids), emb_dir, g + 1, len(groups)
                )


def _check_replaceable(index_dir: Path) -> None:
    """Only an index directory (or an empty or missing one) may be replaced whole."""
    folder = readable_dir(index_dir)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / INDEX_META_FILE).exists():
        raise InputError(
            f"exists and is not an index directory (no {INDEX_META_FILE}); indexing would replace it whole: "
            "choose a new output directory",
            path=index_dir,
        )
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError("exists and is not a directory", path=index_dir)
