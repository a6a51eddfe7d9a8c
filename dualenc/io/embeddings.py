"""On-disk layout of encoded embeddings: one ``.npy`` + one ids file per shard, plus ``meta.json``.

::

    emb_dir/
      meta.json                     {"dim", "dtype", "num_shards", "count", "model", "kind", ...}
      emb.00000-of-00002.npy        (N_0, D) float32 or float16, memory-mappable
      ids.00000-of-00002.txt        N_0 ids, one per line, in the same order as the rows
      emb.00001-of-00002.npy ...

Shard ``p`` of ``P`` holds the contiguous block :func:`shard_bounds` gives, in collection order.
``meta.json`` is written last, so a directory without it is unfinished; ``meta.json["made_by"]`` records
what made the vectors (model, tokenizer, collection, kind, dtype, rows), which :func:`check_made_by`
compares before anything reuses or resumes them. :func:`read_meta` and :func:`load_embeddings` refuse an
unfinished directory (no ``meta.json``, a shard missing, a ``.npy`` shorter or longer than its header says).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualenc.errors import InputError
from dualenc.io.atomic import save_npy, write_json, write_lines

META_FILE = "meta.json"


@dataclass(frozen=True)
class EmbeddingShard:
    """One shard: ``ids[i]`` is the id of row ``emb[i]``."""

    ids: list[str]
    emb: np.ndarray  # (N_p, D), usually a read-only memmap


def shard_bounds(num_rows: int, index: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, end) of contiguous shard ``index``; the first ``num_rows % num_shards`` get one more."""
    base, extra = divmod(num_rows, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_name(index: int, num_shards: int) -> str:
    """``00001-of-00004``: the part of a shard's file names that says which shard it is."""
    return f"{index:05d}-of-{num_shards:05d}"


def shard_paths(emb_dir: str | os.PathLike, index: int, num_shards: int) -> tuple[Path, Path]:
    """Paths of the embedding and ids files of shard ``index`` of ``num_shards``."""
    name = shard_name(index, num_shards)
    return Path(emb_dir) / f"emb.{name}.npy", Path(emb_dir) / f"ids.{name}.txt"


def write_shard(
    emb_dir: str | os.PathLike, index: int, num_shards: int, ids: list[str], emb: np.ndarray
) -> None:
    """Write one shard atomically (ids first, then embeddings: a shard counts as done once both exist)."""
    if len(ids) != emb.shape[0]:
        raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embedding rows")
    emb_path, ids_path = shard_paths(emb_dir, index, num_shards)
    write_lines(ids_path, ids)
    save_npy(emb_path, emb)


def write_meta(emb_dir: str | os.PathLike, meta: dict) -> None:
    """Write ``meta.json`` atomically."""
    write_json(Path(emb_dir) / META_FILE, meta)


def read_meta(emb_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a complete embeddings directory; one ``InputError`` naming the file otherwise.

    Complete: ``meta.json`` is valid, and every shard it lists has both files, with ``.npy`` sizes that
    agree with their headers and rows that add up to ``count``.
    """
    path = Path(emb_dir) / META_FILE
    if not Path(emb_dir).is_dir():
        raise InputError("no such embeddings directory; run `dualenc encode` first", path=emb_dir)
    if not path.exists():
        raise InputError(
            "missing: not a finished embeddings directory (the encode did not finish, or none ran here); "
            "run `dualenc encode` to finish it",
            path=path,
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", path=path) from None
    missing = [key for key in ("dim", "num_shards", "count") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise InputError(f"no {missing[0]!r} entry: not an embeddings meta.json", path=path)
    rows = 0
    for index in range(meta["num_shards"]):
        emb_path, ids_path = shard_paths(emb_dir, index, meta["num_shards"])
        for shard_file in (emb_path, ids_path):
            if not shard_file.exists():
                raise InputError("missing shard file (encode did not finish?)", path=shard_file)
        shape, _ = npy_header(emb_path)
        if len(shape) != 2 or (shape[0] and shape[1] != meta["dim"]):
            raise InputError(f"embeddings of shape {shape}, meta.json says dim {meta['dim']}", path=emb_path)
        rows += shape[0]
    if rows != meta["count"]:
        raise InputError(f"the shards hold {rows} rows, meta.json says count {meta['count']}", path=path)
    return meta


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` from its header; ``InputError`` if its size disagrees (truncated)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
            read = np.lib.format.read_array_header_2_0 if version == (2, 0) else read
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read(fh)
            offset = fh.tell()
    except (ValueError, OSError) as err:
        raise InputError(f"not a readable .npy file ({err})", path=path) from None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise InputError(
            f"{'truncated' if actual < expected else 'wrong size'}: its header says {shape} {dtype} "
            f"({expected} bytes) but the file has {actual} bytes",
            path=path,
        )
    return shape, dtype


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Refuse an output path that is a file, or under one, or in a folder this process cannot write."""
    existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:  # the nearest folder that exists
        existing = existing.parent
    if not existing.is_dir():
        raise InputError("is a file, not a directory: cannot write embeddings there", path=existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError("not writable: cannot write embeddings there", path=existing)


def check_made_by(where: str | os.PathLike, what: str, old: dict | None, new: dict) -> None:
    """Refuse to reuse or resume ``what`` in ``where`` when what made it (``old``) differs from ``new``.

    One ``InputError`` naming the directory, the first field that differs and both values. ``old`` is
    ``None`` for files written without a record (an older dualenc).
    """
    if old is None:
        raise InputError(
            f"{what} has no record of the model and collection that made it (written by an older dualenc); "
            "use --overwrite (overwrite=True) to encode again from scratch",
            path=where,
        )
    for field in [*new, *(k for k in old if k not in new)]:
        if old.get(field) != new.get(field):
            raise InputError(
                f"{what} was made with {field}={old.get(field)!r}, this run has {field}={new.get(field)!r}; "
                "rerun with the same model and collection to reuse or resume it, or use --overwrite "
                "(overwrite=True) to encode again from scratch",
                path=where,
            )


def read_ids(path: str | os.PathLike) -> list[str]:
    """One id per line, in file order."""
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def write_collection_meta(
    out_dir: str | os.PathLike, *, num_shards: int, model_name: str, kind: str, extra: dict | None = None
) -> dict:
    """Write ``meta.json`` once all ``num_shards`` shards exist (count and dim read back from the shards)."""
    count, dim, dtype = 0, None, None
    for index in range(num_shards):
        emb_path, ids_path = shard_paths(out_dir, index, num_shards)
        if not (emb_path.exists() and ids_path.exists()):
            raise InputError("shard not finished; cannot write meta.json", path=emb_path)
        shape, npy_dtype = npy_header(emb_path)
        count += shape[0]
        if shape[0]:
            dim, dtype = shape[1], str(npy_dtype)
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


def load_embeddings(emb_dir: str | os.PathLike, *, mmap: bool = True) -> list[EmbeddingShard]:
    """Load every shard listed by ``meta.json`` (memory-mapped by default), checking ids against rows.

    An unfinished directory is refused as :func:`read_meta` refuses it, before any shard is loaded.
    """
    meta = read_meta(emb_dir)
    shards = []
    seen: set[str] = set()
    for index in range(meta["num_shards"]):
        emb_path, ids_path = shard_paths(emb_dir, index, meta["num_shards"])
        emb = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        ids = read_ids(ids_path)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise InputError(f"{len(ids)} ids but embeddings have shape {emb.shape}", path=ids_path)
        if emb.shape[1] != meta["dim"]:
            raise InputError(f"embedding dim {emb.shape[1]} != meta dim {meta['dim']}", path=emb_path)
        for line_no, doc_id in enumerate(ids, start=1):
            if doc_id in seen:
                raise InputError(f"duplicate id '{doc_id}'", path=ids_path, line=line_no)
            seen.add(doc_id)
        shards.append(EmbeddingShard(ids=ids, emb=emb))
    return shards
