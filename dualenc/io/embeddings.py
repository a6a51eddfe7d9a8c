"""On-disk layout of encoded embeddings: one ``.npy`` + one ids file per shard, plus ``meta.json``.

::

    emb_dir/
      meta.json                     {"dim", "dtype", "num_shards", "count", "model", "kind", ...}
      emb.00000-of-00002.npy        (N_0, D) float32 or float16, memory-mappable
      ids.00000-of-00002.txt        N_0 ids, one per line, in the same order as the rows
      emb.00001-of-00002.npy ...

Shard ``p`` of ``P`` holds the contiguous block :func:`shard_bounds` gives, in collection order.
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
    """``meta.json`` of an embeddings directory; ``InputError`` if there is none."""
    path = Path(emb_dir) / META_FILE
    if not path.exists():
        raise InputError(
            "not an embeddings directory (no meta.json); run `dualenc encode` first", path=emb_dir
        )
    return json.loads(path.read_text(encoding="utf-8"))


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


def load_embeddings(emb_dir: str | os.PathLike, *, mmap: bool = True) -> list[EmbeddingShard]:
    """Load every shard listed by ``meta.json`` (memory-mapped by default), checking ids against rows."""
    meta = read_meta(emb_dir)
    shards = []
    seen: set[str] = set()
    for index in range(meta["num_shards"]):
        emb_path, ids_path = shard_paths(emb_dir, index, meta["num_shards"])
        for path in (emb_path, ids_path):
            if not path.exists():
                raise InputError("missing shard file (encode did not finish?)", path=path)
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
