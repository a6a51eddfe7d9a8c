"""Encode a collection (or topics) into an embeddings directory: sharded over processes, resumable, atomic.

Each process encodes one contiguous shard of the collection (``dualenc.io.embeddings.shard_bounds``). Inside a
shard, rows are processed in fixed chunks of ``chunk_size``; after each chunk the rows are flushed to a
memory-mapped ``.partial.npy`` and a small progress file records how many rows are done (written atomically).
After ``kill -9`` a rerun reopens the partial file and continues at the first unfinished chunk: no passage is
encoded twice into the output, none is lost, and because chunk boundaries and the batches inside a chunk are
deterministic, the result is identical to an uninterrupted run. When the shard is complete its ids file is
written and the partial file is renamed to its final name, so a shard counts as done only once both final
files exist.

What made the rows (``made_by``: the model's weights, tokenizer, length, prefix and pooling, the collection,
kind, storage dtype and rows) is recorded in the progress file, beside each finished shard and in
``meta.json``. A rerun that would resume or reuse rows made by anything else is refused with one
``InputError`` naming the field that differs, unless ``overwrite=True``, which encodes from scratch (the old
files stay until each new shard replaces them). Every argument is checked before any file is touched, and one
writer at a time holds the directory (``dualenc.io.lock.output_lock``). The directory layout is
``dualenc.io.embeddings``'s; texts are encoded by ``dualenc.retrieval.encode.encode_texts``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dualenc.errors import InputError
from dualenc.io.atomic import save_npy, write_json, write_lines
from dualenc.io.embeddings import (
    META_FILE,
    check_made_by,
    check_output_dir,
    shard_bounds,
    shard_paths,
    write_collection_meta,
)
from dualenc.io.lock import output_lock
from dualenc.io.readers import doc_texts, read_collection, read_queries
from dualenc.retrieval.encode import encode_texts, encoder_identity

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class _ShardFiles:
    """The files of one shard: the final embeddings and ids, and the state of an unfinished encode."""

    emb: Path  # final (N_p, D) .npy
    ids: Path  # final ids, one per line
    done: Path  # JSON: what the final files were made from (made_by)
    partial: Path  # (N_p, D) memmap filled chunk by chunk
    progress: Path  # JSON: made_by, rows done, rows in the shard

    @classmethod
    def of(cls, out_dir: Path, index: int, num_shards: int) -> _ShardFiles:
        """The files of shard ``index`` of ``num_shards`` in ``out_dir``."""
        emb, ids = shard_paths(out_dir, index, num_shards)
        suffixes = (".made_by.json", ".partial.npy", ".progress.json")
        return cls(emb, ids, *(emb.with_suffix(suffix) for suffix in suffixes))


def check_encode_args(
    out_dir: str | os.PathLike, *, kind: str, batch_size: int, chunk_size: int, storage_dtype: str
) -> Path:
    """Refuse bad arguments before any file is touched; returns ``out_dir`` as a ``Path``."""
    if kind not in ("query", "doc"):
        raise InputError(f"kind must be 'query' or 'doc', got {kind!r}")
    for name, value in (("batch size", batch_size), ("chunk size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
    if storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"storage dtype {storage_dtype!r} not in {sorted(STORAGE_DTYPES)}")
    check_output_dir(out_dir)
    return Path(out_dir)


def collection_identity(collection, kind: str, storage_dtype: str) -> dict:
    """What a directory records of its rows: the collection (its datasets fingerprint), kind, dtype, rows."""
    return {
        "collection": getattr(collection, "_fingerprint", None),
        "kind": kind,
        "storage_dtype": storage_dtype,
        "rows": len(collection),
    }


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
    overwrite: bool = False,
) -> Path:
    """Encode this process's shard of ``collection`` (a dataset with ``id``, ``text`` and optional ``title``).

    Resumable: rerunning with the same model and collection continues an interrupted run (module docstring).
    A finished or partial shard made by another model, tokenizer, collection, kind or storage dtype is
    refused (``InputError`` naming the field) unless ``overwrite``, which encodes the shard from scratch.
    ``model_id`` replaces :func:`~dualenc.retrieval.encode.model_fingerprint` as the weights' identity.
    The shard holds its own lock (``.<shard>.partial.npy.lock`` in ``out_dir``) while it is written.
    Call ``dualenc.io.embeddings.write_collection_meta`` once every shard is done (:func:`encode_corpus`
    does it on process 0).

    Returns:
        the path of the shard's ``.npy`` file.
    """
    out_dir = check_encode_args(
        out_dir, kind=kind, batch_size=batch_size, chunk_size=chunk_size, storage_dtype=storage_dtype
    )
    start, end = shard_bounds(len(collection), process_index, num_processes)
    files = _ShardFiles.of(out_dir, process_index, num_processes)
    made_by = {
        **encoder_identity(model, kind, model_id or None),
        **collection_identity(collection, kind, storage_dtype),
        "shard": [process_index, num_processes],
        "shard_rows": [start, end],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(files.partial):
        if not overwrite and _reuse_finished(files, made_by):
            return files.emb
        done = 0 if overwrite else _resume_point(files, made_by)
        if overwrite:  # unfinished state of an earlier run; finished files stay until replaced
            files.progress.unlink(missing_ok=True)
        encode_kwargs = {"kind": kind, "batch_size": batch_size, "device": device}
        with tqdm(
            total=end - start, initial=done, disable=not progress, desc=f"encode shard {process_index}"
        ) as bar:
            encode_kwargs.update(autocast_dtype=autocast_dtype, on_batch=bar.update)
            _encode_chunks(model, collection, files, made_by, done, chunk_size, encode_kwargs)
        ids = list(collection[start:end]["id"]) if end > start else []
        _finish_shard(files, ids, made_by, int(getattr(model, "dim", 0)))
    return files.emb


def _reuse_finished(files: _ShardFiles, made_by: dict) -> bool:
    """True when the shard's final files exist and were made by ``made_by``; refused when made by another."""
    if not (files.emb.exists() and files.ids.exists()):
        return False
    old = json.loads(files.done.read_text(encoding="utf-8")) if files.done.exists() else None
    check_made_by(files.emb.parent, f"finished shard {files.emb.name}", old, made_by)
    logger.info("shard %s already encoded, skipping", files.emb.name)
    return True


def _resume_point(files: _ShardFiles, made_by: dict) -> int:
    """Rows already done in an interrupted run (0 when starting fresh); refused when made by another."""
    if not files.progress.exists() or not files.partial.exists():
        return 0
    state = json.loads(files.progress.read_text(encoding="utf-8"))
    check_made_by(files.emb.parent, f"interrupted encode {files.partial.name}", state.get("made_by"), made_by)
    logger.info("resuming %s at row %d of %d", files.partial.name, state["done"], state["rows"])
    return int(state["done"])


def _encode_chunks(
    model, collection, files: _ShardFiles, made_by: dict, done: int, chunk_size: int, encode_kwargs: dict
) -> None:
    """Encode rows ``[start + done, end)`` chunk by chunk into the partial memmap, recording progress."""
    start, end = made_by["shard_rows"]
    num_rows = end - start
    emb = np.load(files.partial, mmap_mode="r+") if done > 0 else None  # (num_rows, D)
    for chunk_start in range(done, num_rows, chunk_size):
        chunk_end = min(chunk_start + chunk_size, num_rows)
        texts = doc_texts(collection[start + chunk_start : start + chunk_end])
        vectors = encode_texts(model, texts, **encode_kwargs)  # (chunk, D)
        if emb is None:
            dtype, shape = STORAGE_DTYPES[made_by["storage_dtype"]], (num_rows, vectors.shape[1])
            emb = np.lib.format.open_memmap(files.partial, mode="w+", dtype=dtype, shape=shape)
        emb[chunk_start:chunk_end] = vectors
        emb.flush()
        write_json(files.progress, {"made_by": made_by, "done": chunk_end, "rows": num_rows})


def _finish_shard(files: _ShardFiles, ids: list[str], made_by: dict, dim: int) -> None:
    """Write the ids and the record, then give the partial rows their final name (empty shard: (0, dim))."""
    write_lines(files.ids, ids)
    write_json(files.done, made_by)
    if not ids:  # empty shard (more processes than rows)
        save_npy(files.emb, np.zeros((0, dim), np.float32))
    else:
        os.replace(files.partial, files.emb)
    files.progress.unlink(missing_ok=True)


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
    overwrite: bool = False,
) -> Path:
    """Encode a whole collection (or topics) into an embeddings directory, ``meta.json`` included.

    The directory is what ``dualenc index --embeddings``,
    :func:`dualenc.retrieval.index_dir.index_from_embeddings` and
    :func:`dualenc.retrieval.search.search_vectors` read. Resumable like :func:`encode_collection`; a
    directory (finished or not) made by another model, tokenizer, collection, kind or storage dtype is
    refused with an ``InputError`` naming the field, unless ``overwrite``. Process 0 holds the directory's
    :func:`~dualenc.io.lock.output_lock` for the whole encode, so a second run into it is refused.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder`, already on ``device`` (and in eval mode).
        collection: a collection file (``.tsv`` or BEIR ``.jsonl``, as
            :func:`dualenc.io.readers.read_collection` reads; topics for ``kind="query"``), or a dataset
            already read (``id``, ``text``, optional ``title``).
        out_dir: the embeddings directory.
        kind: ``"doc"`` (document tower) or ``"query"`` (query tower).
        batch_size, chunk_size, device, autocast_dtype, storage_dtype, progress: as :func:`encode_collection`.
        model_name: ``meta.json``'s ``model`` (the CLI records the model dir); default the fingerprint.
        source: recorded as ``meta.json``'s ``source``; default the path when ``collection`` is one.
        cache_dir: datasets cache directory for reading a collection file.
        process_index, num_processes, wait_for_everyone: sharding over processes (e.g. Accelerate's
            ``PartialState``): each process encodes its shard, waits for all; process 0 writes ``meta.json``.
        overwrite: encode from scratch whatever the directory holds (``meta.json`` is removed first, so the
            directory counts as unfinished until the new one is written).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("encoding with num_processes > 1 needs wait_for_everyone (a barrier)")
    settings = dict(kind=kind, batch_size=batch_size, chunk_size=chunk_size, storage_dtype=storage_dtype)
    out_dir = check_encode_args(out_dir, **settings)
    settings.update(process_index=process_index, num_processes=num_processes, device=device)
    settings.update(autocast_dtype=autocast_dtype, progress=progress, overwrite=overwrite)
    if isinstance(collection, str | os.PathLike):
        source = str(collection) if source is None else source
        collection = (read_queries if kind == "query" else read_collection)(collection, cache_dir=cache_dir)
    made_by = {**encoder_identity(model, kind), **collection_identity(collection, kind, storage_dtype)}
    barrier = wait_for_everyone or (lambda: None)
    with output_lock(out_dir) if process_index == 0 else contextlib.nullcontext():
        if process_index == 0:
            _check_meta(out_dir, made_by, overwrite)
        barrier()  # no process writes before process 0 holds the lock and has checked meta.json
        encode_collection(model, collection, out_dir, **settings, model_id=made_by["model_fingerprint"])
        barrier()
        if process_index == 0:
            _write_meta(out_dir, model, made_by, num_processes, model_name, source)
    return out_dir


def _write_meta(out_dir: Path, model, made_by: dict, num_shards: int, model_name, source) -> None:
    """``meta.json``, written once every shard is done: counts, the model's name and what made the rows."""
    fingerprint = made_by["model_fingerprint"]
    extra = {"normalize": bool(model.config.normalize), "model_fingerprint": fingerprint, "made_by": made_by}
    extra.update({"source": source} if source is not None else {})
    name, kind = model_name or fingerprint, made_by["kind"]
    meta = write_collection_meta(out_dir, num_shards=num_shards, model_name=name, kind=kind, extra=extra)
    logger.info("wrote %d embeddings (dim %d) to %s", meta["count"], meta["dim"], out_dir)


def _check_meta(out_dir: Path, made_by: dict, overwrite: bool) -> None:
    """Refuse a finished directory made by anything else; with ``overwrite`` mark it unfinished instead."""
    path = out_dir / META_FILE
    if path.exists() and overwrite:
        path.unlink()
    elif path.exists():
        try:
            old = json.loads(path.read_text("utf-8")).get("made_by")
        except (ValueError, AttributeError) as err:
            raise InputError(f"unreadable ({err}); use --overwrite to encode again", path=path) from None
        check_made_by(out_dir, "the embeddings directory", old, made_by)
