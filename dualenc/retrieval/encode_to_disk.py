"""Encode a collection (or topics) into an embeddings directory: sharded over processes, resumable, atomic.

Each process encodes one contiguous shard of the collection (``dualenc.io.embeddings.shard_bounds``). Inside a
shard, rows are processed in fixed chunks of ``chunk_size``; after each chunk the rows are flushed to a
memory-mapped ``.partial.npy`` and a small progress file records how many rows are done (written atomically).
After ``kill -9`` a rerun reopens the partial file and continues at the first unfinished chunk: no passage is
encoded twice into the output, none is lost, and because chunk boundaries and the batches inside a chunk are
deterministic, the result is identical to an uninterrupted run. When the shard is complete its ids file is
written and the partial file is renamed to its final name, so a shard counts as done only once both final
files exist. The directory layout is ``dualenc.io.embeddings``'s; texts are encoded by
``dualenc.retrieval.encode.encode_texts``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dualenc.errors import InputError
from dualenc.io.atomic import save_npy, write_json, write_lines, write_text
from dualenc.io.embeddings import shard_bounds, shard_paths, write_collection_meta
from dualenc.io.readers import doc_texts, read_collection, read_queries
from dualenc.retrieval.encode import encode_texts, model_fingerprint

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class _ShardFiles:
    """The files of one shard: the final embeddings and ids, and the state of an unfinished encode."""

    emb: Path  # final (N_p, D) .npy
    ids: Path  # final ids, one per line
    done: Path  # fingerprint of what the final files were made from
    partial: Path  # (N_p, D) memmap filled chunk by chunk
    progress: Path  # JSON: fingerprint, rows done, rows in the shard

    @classmethod
    def of(cls, out_dir: Path, index: int, num_shards: int) -> _ShardFiles:
        """The files of shard ``index`` of ``num_shards`` in ``out_dir``."""
        emb, ids = shard_paths(out_dir, index, num_shards)
        suffixes = (".fingerprint", ".partial.npy", ".progress.json")
        return cls(emb, ids, *(emb.with_suffix(suffix) for suffix in suffixes))


def _fingerprint(collection, start: int, end: int, settings: dict) -> str:
    """What a shard is made from: the dataset's fingerprint, the rows and the encode settings."""
    key = json.dumps(
        {"data": getattr(collection, "_fingerprint", None), "rows": [start, end], **settings}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def encode_collection(
    model,
    collection,
    out_dir: str | os.PathLike,
    *,
    kind: str = "doc",
    batch_size: int = 128,
    chunk_size: int = 8192,
    process_index: int = 0,
    num_processes: int = 1,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    storage_dtype: str = "float32",
    progress: bool = True,
    model_id: str = "",
) -> Path:
    """Encode this process's shard of ``collection`` (a dataset with ``id``, ``text`` and optional ``title``).

    Resumable: rerunning with the same arguments continues an interrupted run (see module docstring).
    ``model_id`` identifies the weights (e.g. :func:`~dualenc.retrieval.encode.model_fingerprint`): a finished
    or partial shard made with another model is not reused; a finished one is re-encoded, a partial one is an
    error.
    Call ``dualenc.io.embeddings.write_collection_meta`` once every shard is done (:func:`encode_corpus`
    does it on process 0).

    Returns:
        the path of the shard's ``.npy`` file.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"storage dtype {storage_dtype!r} not in {sorted(STORAGE_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, end = shard_bounds(len(collection), process_index, num_processes)
    files = _ShardFiles.of(out_dir, process_index, num_processes)
    settings = {
        "kind": kind,
        "chunk": chunk_size,
        "batch": batch_size,
        "dtype": storage_dtype,
        "model": model_id,
    }
    fingerprint = _fingerprint(collection, start, end, settings)
    if _reuse_finished(files, fingerprint):
        return files.emb
    done = _resume_point(files, fingerprint)
    encode_kwargs = {
        "kind": kind,
        "batch_size": batch_size,
        "device": device,
        "autocast_dtype": autocast_dtype,
    }
    with tqdm(
        total=end - start,
        initial=done,
        disable=not progress,
        desc=f"encode shard {process_index}",
        unit="doc",
    ) as bar:
        _encode_chunks(
            model,
            collection,
            (start, end),
            done,
            files,
            fingerprint,
            chunk_size=chunk_size,
            dtype=STORAGE_DTYPES[storage_dtype],
            encode_kwargs={**encode_kwargs, "on_batch": bar.update},
        )
    ids = list(collection[start:end]["id"]) if end > start else []
    _finish_shard(files, ids, fingerprint, _model_dim(model))
    return files.emb


def _reuse_finished(files: _ShardFiles, fingerprint: str) -> bool:
    """True when the shard's final files exist and were made from ``fingerprint`` (or predate fingerprints).

    Final files made from other data, settings or weights are removed, so the shard is encoded again.
    """
    if not (files.emb.exists() and files.ids.exists()):
        return False
    if not files.done.exists() or files.done.read_text().strip() == fingerprint:
        logger.info("shard %s already encoded, skipping", files.emb.name)
        return True
    logger.info("shard %s was encoded with other data, settings or weights: encoding again", files.emb.name)
    files.emb.unlink()
    return False


def _resume_point(files: _ShardFiles, fingerprint: str) -> int:
    """Rows already done in an interrupted run (0 when starting fresh)."""
    if not files.progress.exists() or not files.partial.exists():
        files.partial.unlink(missing_ok=True)
        return 0
    state = json.loads(files.progress.read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        raise InputError(
            "an interrupted encode with different data or settings is here; delete it or use the same "
            "settings to resume",
            path=files.progress,
        )
    logger.info("resuming %s at row %d of %d", files.partial.name, state["done"], state["rows"])
    return int(state["done"])


def _encode_chunks(
    model,
    collection,
    rows: tuple[int, int],
    done: int,
    files: _ShardFiles,
    fingerprint: str,
    *,
    chunk_size: int,
    dtype: type[np.floating],
    encode_kwargs: dict[str, Any],
) -> None:
    """Encode rows ``[start + done, end)`` chunk by chunk into the partial memmap, recording progress."""
    start, end = rows
    num_rows = end - start
    emb = np.load(files.partial, mmap_mode="r+") if done > 0 else None  # (num_rows, D)
    for chunk_start in range(done, num_rows, chunk_size):
        chunk_end = min(chunk_start + chunk_size, num_rows)
        texts = doc_texts(collection[start + chunk_start : start + chunk_end])
        vectors = encode_texts(model, texts, **encode_kwargs)  # (chunk, D)
        if emb is None:
            emb = np.lib.format.open_memmap(
                files.partial, mode="w+", dtype=dtype, shape=(num_rows, vectors.shape[1])
            )
        emb[chunk_start:chunk_end] = vectors
        emb.flush()
        write_json(files.progress, {"fingerprint": fingerprint, "done": chunk_end, "rows": num_rows})


def _finish_shard(files: _ShardFiles, ids: list[str], fingerprint: str, dim: int) -> None:
    """Write the ids, then give the partial embeddings their final name; an empty shard gets (0, ``dim``)."""
    if not ids:  # empty shard (more processes than rows)
        write_lines(files.ids, [])
        save_npy(files.emb, np.zeros((0, dim), np.float32))
    else:
        write_lines(files.ids, ids)
        write_text(files.done, fingerprint + "\n")
        os.replace(files.partial, files.emb)
    files.progress.unlink(missing_ok=True)


def _model_dim(model) -> int:
    return int(getattr(model, "dim", 0))


def encode_corpus(
    model,
    collection,
    out_dir: str | os.PathLike,
    *,
    kind: str = "doc",
    batch_size: int = 128,
    chunk_size: int = 8192,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    storage_dtype: str = "float32",
    progress: bool = False,
    model_name: str | None = None,
    source: str | None = None,
    cache_dir: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], object] | None = None,
) -> Path:
    """Encode a whole collection (or topics) into an embeddings directory, ``meta.json`` included.

    The directory is what ``dualenc index --embeddings``,
    :func:`dualenc.retrieval.index_dir.index_from_embeddings` and
    :func:`dualenc.retrieval.search.search_vectors` read. Resumable like :func:`encode_collection`, whose
    ``model_id`` is the weights' :func:`~dualenc.retrieval.encode.model_fingerprint`: a finished shard made
    with other weights is encoded again.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder`, already on ``device`` (and in eval mode).
        collection: a collection file (``.tsv`` or BEIR ``.jsonl``, as
            :func:`dualenc.io.readers.read_collection` reads; topics for ``kind="query"``), or a dataset
            already read (``id``, ``text``, optional ``title``).
        out_dir: the embeddings directory.
        kind: ``"doc"`` (document tower) or ``"query"`` (query tower).
        batch_size, chunk_size, device, autocast_dtype, storage_dtype, progress: as :func:`encode_collection`.
        model_name: recorded as ``meta.json``'s ``model`` (the CLI records the model dir); default the
            fingerprint.
        source: recorded as ``meta.json``'s ``source``; default the path when ``collection`` is one.
        cache_dir: datasets cache directory for reading a collection file.
        process_index, num_processes, wait_for_everyone: sharding over processes (e.g. Accelerate's
            ``PartialState``): each process encodes its shard, waits for all; process 0 writes ``meta.json``.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if kind not in ("query", "doc"):
        raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("encoding with num_processes > 1 needs wait_for_everyone (a barrier)")
    if isinstance(collection, str | os.PathLike):
        source = str(collection) if source is None else source
        read = read_queries if kind == "query" else read_collection
        collection = read(collection, cache_dir=cache_dir)
    fingerprint = model_fingerprint(model)
    encode_collection(
        model,
        collection,
        out_dir,
        kind=kind,
        batch_size=batch_size,
        chunk_size=chunk_size,
        process_index=process_index,
        num_processes=num_processes,
        device=device,
        autocast_dtype=autocast_dtype,
        storage_dtype=storage_dtype,
        progress=progress,
        model_id=fingerprint,
    )
    if wait_for_everyone is not None:
        wait_for_everyone()
    if process_index == 0:
        extra = {"normalize": bool(model.config.normalize), "model_fingerprint": fingerprint}
        if source is not None:
            extra["source"] = source
        meta = write_collection_meta(
            out_dir, num_shards=num_processes, model_name=model_name or fingerprint, kind=kind, extra=extra
        )
        logger.info("wrote %d embeddings (dim %d) to %s", meta["count"], meta["dim"], out_dir)
    return Path(out_dir)
