"""Files on disk: IR inputs (collections, queries, qrels), runs, embeddings directories, atomic writes,
provenance and text tables. The lowest layer above dualenc.errors: it imports nothing else of dualenc."""

from dualenc.io.atomic import atomic_dir, atomic_path, save_npy, write_json, write_lines, write_text
from dualenc.io.embeddings import (
    EmbeddingShard,
    load_embeddings,
    read_meta,
    shard_bounds,
    write_collection_meta,
    write_shard,
)
from dualenc.io.input_files import existing_file, iter_lines, read_json
from dualenc.io.lock import output_lock
from dualenc.io.provenance import dir_fingerprint, environment_info, git_commit
from dualenc.io.qrels import read_qrels
from dualenc.io.readers import doc_text, doc_texts, read_collection, read_queries
from dualenc.io.runs import Run, read_run, run_from_search, sorted_hits, write_run
from dualenc.io.text_table import format_table

__all__ = [
    "EmbeddingShard",
    "Run",
    "atomic_dir",
    "atomic_path",
    "dir_fingerprint",
    "doc_text",
    "doc_texts",
    "environment_info",
    "existing_file",
    "format_table",
    "git_commit",
    "iter_lines",
    "load_embeddings",
    "output_lock",
    "read_collection",
    "read_json",
    "read_meta",
    "read_qrels",
    "read_queries",
    "read_run",
    "run_from_search",
    "save_npy",
    "shard_bounds",
    "sorted_hits",
    "write_collection_meta",
    "write_json",
    "write_lines",
    "write_run",
    "write_shard",
    "write_text",
]
