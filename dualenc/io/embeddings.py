"""On-disk layout of encoded embeddings: one ``.npy`` + one ids file per shard, plus ``meta.json``.

::

    emb_dir/
      meta.json                     {"dim", "dtype", "num_shards", "count", "normalize", "model", ...}
      emb.00000-of-00002.npy        (N_0, D) float32 or float16, memory-mappable
      ids.00000-of-00002.txt        N_0 ids, one per line, in the same order as the rows
      emb.00001-of-00002.npy ...

Shard ``p`` holds a contiguous block of the collection, in collection order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualenc.errors import InputError
from dualenc.io import atomic

META_FILE = "meta.json"


@dataclass(frozen=True)
class EmbeddingShard:
    """One shard: ``ids[i]`` is the id of row ``emb[i]``."""

    ids: list[str]
    emb: np.ndarray  # (N_p, D), usually a read-only memmap


def shard_name(index: int, num_shards: int) -> str:
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
    atomic.write_lines(ids_path, ids)
    atomic.save_npy(emb_path, emb)


def write_meta(emb_dir: str | os.PathLike, meta: dict) -> None:
    atomic.write_json(Path(emb_dir) / META_FILE, meta)


def read_meta(emb_dir: str | os.PathLike) -> dict:
    path = Path(emb_dir) / META_FILE
    if not path.exists():
        raise InputError(
            "not an embeddings directory (no meta.json); run `dualenc encode` first", path=emb_dir
        )
    return json.loads(path.read_text(encoding="utf-8"))


def read_ids(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


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
