"""Encode a collection (or topics) into an embeddings directory; sharded, resumable, atomic.

Each process encodes one contiguous shard of the collection. Inside a shard, rows are processed in fixed
chunks of ``chunk_size``; after each chunk the rows are flushed to a memory-mapped ``.partial.npy`` and a small
progress file records how many rows are done (written atomically). After ``kill -9`` a rerun reopens the
partial file and continues at the first unfinished chunk: no passage is encoded twice into the output, none is
lost, and because chunk boundaries and the batches inside a chunk are deterministic, the result is identical to
an uninterrupted run. When the shard is complete its ids file is written and the partial file is renamed to
its final name, so a shard counts as done only once both final files exist.

Within a chunk, texts are sorted by length (longest first) so each batch pads to similar lengths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dualenc.errors import InputError
from dualenc.io import atomic
from dualenc.io.embeddings import shard_paths, write_meta, write_shard

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def shard_bounds(num_rows: int, index: int, num_shards: int) -> tuple[int, int]:
    """Row range [start, end) of contiguous shard ``index`` (the first ``num_rows % num_shards`` get one more)."""
    base, extra = divmod(num_rows, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_texts(
    model,
    texts: Sequence[str],
    *,
    kind: str = "doc",
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    on_batch: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Encode ``texts`` with the query (``kind='query'``) or document tower, length-sorted, in input order.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder` (anything with ``tokenize_*``/``encode_*`` methods).
        texts: the strings to encode.
        kind: ``"query"`` or ``"doc"``.
        batch_size: texts per forward pass.
        device: where the model runs (the model must already be there).
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision on GPU; ignored on CPU.
        progress: show a tqdm bar.
        on_batch: called with the number of texts after each batch (e.g. an outer progress bar's ``update``).

    Returns:
        float32 array (len(texts), D).
    """
    if kind not in ("query", "doc"):
        raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
    tokenize = model.tokenize_queries if kind == "query" else model.tokenize_docs
    encode = model.encode_queries if kind == "query" else model.encode_docs
    device = torch.device(device)
    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: similar lengths per batch
    out: np.ndarray | None = None
    for start in tqdm(
        range(0, len(texts), batch_size),
        disable=not progress,
        desc="encode queries" if kind == "query" else "encode docs",
        leave=False,
    ):
        rows = order[start : start + batch_size]
        features = tokenize([texts[i] for i in rows]).to(device)
        with _autocast(device, autocast_dtype):
            vectors = encode(features)  # (b, D)
        vectors = vectors.float().cpu().numpy()
        if not np.isfinite(vectors).all():
            raise FloatingPointError(f"non-finite embedding for text {texts[rows[0]]!r}…")
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
        if on_batch is not None:
            on_batch(len(rows))
    if out is None:
        raise InputError("nothing to encode (no texts)")
    return out


def _fingerprint(collection, start: int, end: int, settings: dict) -> str:
    key = json.dumps(
        {"data": getattr(collection, "_fingerprint", None), "rows": [start, end], **settings}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _collection_texts(collection, start: int, end: int) -> tuple[list[str], list[str]]:
    from dualenc.io.readers import doc_text  # datasets: only where a collection is read

    part = collection[start:end]
    titles = part.get("title") or [""] * (end - start)
    return list(part["id"]), [doc_text(t, x) for t, x in zip(titles, part["text"], strict=True)]


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
    ``model_id`` identifies the weights (e.g. :func:`model_fingerprint`): a finished or partial shard made with
    another model is not reused; a finished one is re-encoded, a partial one is an error.
    Call :func:`write_collection_meta` once every shard is done (the CLI does it on the main process).

    Returns:
        the path of the shard's ``.npy`` file.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"storage dtype {storage_dtype!r} not in {sorted(STORAGE_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, end = shard_bounds(len(collection), process_index, num_processes)
    emb_path, ids_path = shard_paths(out_dir, process_index, num_processes)
    settings = {
        "kind": kind,
        "chunk": chunk_size,
        "batch": batch_size,
        "dtype": storage_dtype,
        "model": model_id,
    }
    fingerprint = _fingerprint(collection, start, end, settings)
    done_path = emb_path.with_suffix(".fingerprint")
    if emb_path.exists() and ids_path.exists():
        if not done_path.exists() or done_path.read_text().strip() == fingerprint:
            logger.info("shard %s already encoded, skipping", emb_path.name)
            return emb_path
        logger.info(
            "shard %s was encoded with other data, settings or weights: encoding again", emb_path.name
        )
        emb_path.unlink()
    partial_path = emb_path.with_suffix(".partial.npy")
    progress_path = emb_path.with_suffix(".progress.json")
    done = _resume_point(partial_path, progress_path, fingerprint)
    num_rows = end - start
    emb = np.load(partial_path, mmap_mode="r+") if done > 0 else None
    bar = tqdm(
        total=num_rows, initial=done, disable=not progress, desc=f"encode shard {process_index}", unit="doc"
    )
    for chunk_start in range(done, num_rows, chunk_size):
        chunk_end = min(chunk_start + chunk_size, num_rows)
        _, texts = _collection_texts(collection, start + chunk_start, start + chunk_end)
        vectors = encode_texts(
            model,
            texts,
            kind=kind,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            on_batch=bar.update,
        )  # (chunk, D)
        if emb is None:
            emb = np.lib.format.open_memmap(
                partial_path,
                mode="w+",
                dtype=STORAGE_DTYPES[storage_dtype],
                shape=(num_rows, vectors.shape[1]),
            )
        emb[chunk_start:chunk_end] = vectors
        emb.flush()
        atomic.write_json(progress_path, {"fingerprint": fingerprint, "done": chunk_end, "rows": num_rows})
    bar.close()
    ids, _ = _collection_texts(collection, start, end) if num_rows else ([], [])
    if emb is None:  # empty shard (more processes than rows)
        write_shard(out_dir, process_index, num_processes, [], np.zeros((0, _model_dim(model)), np.float32))
    else:
        del emb
        atomic.write_lines(ids_path, ids)
        atomic.write_text(done_path, fingerprint + "\n")
        os.replace(partial_path, emb_path)
    progress_path.unlink(missing_ok=True)
    return emb_path


def _resume_point(partial_path: Path, progress_path: Path, fingerprint: str) -> int:
    """Rows already done in an interrupted run (0 when starting fresh)."""
    if not progress_path.exists() or not partial_path.exists():
        partial_path.unlink(missing_ok=True)
        return 0
    state = json.loads(progress_path.read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        raise InputError(
            "an interrupted encode with different data or settings is here; delete it or use the same "
            "settings to resume",
            path=progress_path,
        )
    logger.info("resuming %s at row %d of %d", partial_path.name, state["done"], state["rows"])
    return int(state["done"])


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's current weights: a hash of every parameter's sum and sum of squares."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = param.detach().double()
            digest.update(
                f"{name}:{tuple(param.shape)}:{float(values.sum()):.12e}:{float((values * values).sum()):.12e}".encode()
            )
    return digest.hexdigest()[:16]


def _model_dim(model) -> int:
    return int(getattr(model, "dim", 0))


def write_collection_meta(
    out_dir: str | os.PathLike, *, num_shards: int, model_name: str, kind: str, extra=None
):
    """Write ``meta.json`` once all ``num_shards`` shards exist (count and dim read back from the shards)."""
    count, dim, dtype = 0, None, None
    for index in range(num_shards):
        emb_path, ids_path = shard_paths(out_dir, index, num_shards)
        if not (emb_path.exists() and ids_path.exists()):
            raise InputError("shard not finished; cannot write meta.json", path=emb_path)
        emb = np.load(emb_path, mmap_mode="r")
        count += emb.shape[0]
        if emb.shape[0]:
            dim, dtype = emb.shape[1], str(emb.dtype)
    meta = {
        "dim": dim,
        "dtype": dtype,
        "num_shards": num_shards,
        "count": count,
        "model": model_name,
        "kind": kind,
    }
    meta.update(extra or {})
    write_meta(out_dir, meta)
    return meta


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

    The directory is what ``dualenc index --embeddings``, :func:`dualenc.retrieval.index.index_from_embeddings` and
    :func:`dualenc.retrieval.search.search_vectors` read. Resumable like :func:`encode_collection`, whose ``model_id``
    is the weights' :func:`model_fingerprint`: a finished shard made with other weights is encoded again.

    Args:
        model: a :class:`dualenc.model.encoder.DualEncoder`, already on ``device`` (and in eval mode).
        collection: a collection file (``.tsv`` or BEIR ``.jsonl``, as :func:`dualenc.io.readers.read_collection`
            reads; topics for ``kind="query"``), or a dataset already read (``id``, ``text``, opt. ``title``).
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
        from dualenc.io.readers import read_collection, read_queries

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
