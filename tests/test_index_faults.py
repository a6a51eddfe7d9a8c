"""An index rebuilt over an old one and killed at any moment: `dualenc search` gives the old index's results
or the new one's, never a mix; mixed or foreign inputs are refused with one error line (exit 2)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import brute_force, int_data

from dualenc.cli import main
from dualenc.io.atomic import aside_path
from dualenc.io.embeddings import load_embeddings, read_meta, write_meta, write_shard
from dualenc.io.runs import read_run
from dualenc.retrieval.index import IndexShard, search_shards
from dualenc.retrieval.index_dir import load_index
from dualenc.retrieval.search import search_vectors

HITS = 10

# Rebuilds the index at argv[3] from the embeddings at argv[2], pausing (for the parent to kill it) at the
# stage named by argv[1]; it prints the stage's name once it is there.
BUILDER = """
import os, shutil, sys, time
from pathlib import Path

import dualenc.io.atomic as atomic
import dualenc.retrieval.index as index_mod
import dualenc.retrieval.index_dir as index_dir

stage, emb, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def pause():
    print(stage, flush=True)
    time.sleep(600)

if stage == "add":  # one block of vectors added to the new index, the others not yet
    blocks = index_mod.iter_blocks
    def slow_blocks(*args, **kwargs):
        for i, item in enumerate(blocks(*args, **kwargs)):
            if i == 1:
                pause()
            yield item
    index_mod.iter_blocks = slow_blocks
elif stage == "ids":  # the new .faiss written, its doc ids not yet (where the old code left a mix)
    def slow_write_lines(path, lines):
        pause()
    index_dir.write_lines = slow_write_lines
elif stage == "meta":  # the new shard files written, index_meta.json not yet
    write_json = index_dir.write_json
    def slow_write_json(path, obj):
        if Path(path).name == "index_meta.json":
            pause()
        write_json(path, obj)
    index_dir.write_json = slow_write_json
elif stage == "swap":  # new and old exchanged in one step, the old one (at the temporary name) not deleted
    exchange = atomic._exchange
    def slow_exchange(new, path):
        if exchange(new, path):
            pause()
        return False  # unreachable: killed while paused
    atomic._exchange = slow_exchange
else:  # the swap done by two renames, as where the platform has no exchange call
    atomic._exchange = lambda new, path: False
    replace, rmtree = os.replace, shutil.rmtree
    def slow_replace(src, dst):
        replace(src, dst)
        if stage == "gap" and Path(src) == out:  # the old index moved aside, the new one not yet moved in
            pause()
    def slow_rmtree(path, *args, **kwargs):
        if stage == "cleanup" and Path(path) == atomic.aside_path(out):  # the old index half deleted
            next(Path(path).glob("*.faiss")).unlink()
            pause()
        rmtree(path, *args, **kwargs)
    os.replace, shutil.rmtree = slow_replace, slow_rmtree
index_dir.index_from_embeddings(emb, out, "Flat", add_batch_size=64)
"""


def _write_emb(folder: Path, ids: list[str], vectors: np.ndarray, fingerprint: str, kind: str) -> Path:
    write_shard(folder, 0, 1, ids, vectors)
    meta = {"dim": vectors.shape[1], "dtype": "float32", "num_shards": 1, "count": len(ids)}
    write_meta(
        folder, {**meta, "model": f"model-{fingerprint}", "model_fingerprint": fingerprint, "kind": kind}
    )
    return folder


@pytest.fixture
def world(tmp_path):
    """Old and new document embeddings (the same ids in another order, other vectors), queries, and the
    exact top hits of each."""
    queries, docs_old, doc_ids = int_data(seed=0, num_docs=300)
    _, docs_new, _ = int_data(seed=1, num_docs=300)
    new_ids = doc_ids[::-1]
    qids = [f"q{i}" for i in range(len(queries))]

    def oracle(docs, ids):
        _, rows = brute_force(queries, docs, np.asarray(ids), HITS)
        return {q: [ids[r] for r in row] for q, row in zip(qids, rows.tolist(), strict=True)}

    w = {
        "old": _write_emb(tmp_path / "emb_old", doc_ids, docs_old, "m1", "doc"),
        "new": _write_emb(tmp_path / "emb_new", new_ids, docs_new, "m1", "doc"),
        "queries": _write_emb(tmp_path / "queries", qids, queries, "m1", "query"),
        "old_hits": oracle(docs_old, doc_ids),
        "new_hits": oracle(docs_new, new_ids),
        "out": tmp_path / "index",
        "tmp": tmp_path,
        "doc_ids": doc_ids,
    }
    assert w["old_hits"] != w["new_hits"]
    return w


def _index(emb: Path, out: Path, *extra: str) -> int:
    return main(["-q", "index", "--embeddings", str(emb), "--output", str(out), *extra])


def _search(w: dict, index: Path, queries: Path | None = None):
    """The run's ranked doc ids per query, or None when the search was refused (exit 2)."""
    run_path = w["tmp"] / "run.trec"
    run_path.unlink(missing_ok=True)
    argv = ["-q", "search", "--queries", str(queries or w["queries"]), "--index", str(index)]
    code = main([*argv, "--output", str(run_path), "--hits", str(HITS)])
    if code == 2:
        assert not run_path.exists()
        return None
    assert code == 0
    run = read_run(run_path)
    return {q: [d for d, _ in sorted(hits.items(), key=lambda h: (-h[1], h[0]))] for q, hits in run.items()}


def _search_library(w: dict, index: Path):
    """As ``_search``, through ``search_vectors`` (the library the command calls)."""
    (shard,) = load_embeddings(w["queries"])
    run = search_vectors(shard.ids, shard.emb, index, k=HITS, query_meta=read_meta(w["queries"]))
    return {q: [d for d, _ in sorted(hits.items(), key=lambda h: (-h[1], h[0]))] for q, hits in run.items()}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualenc: error: "), err
    return err[0]


def _start_builder(w: dict, stage: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", BUILDER, stage, str(w["new"]), str(w["out"])]
    with open(w["tmp"] / f"builder.{stage}.log", "w") as log:  # the child keeps its own descriptor
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = child.stdout.readline().strip()
    assert line == stage, (w["tmp"] / f"builder.{stage}.log").read_text()
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL  # the kill happened
    child.stdout.close()


def _temporary_dirs(w: dict) -> list[Path]:
    return sorted(w["tmp"].glob(".index.*.tmp"))


def _assert_unfinished(w: dict, stage: str, old_meta: bytes) -> None:
    """The state at the moment of the kill: the new index is not (completely) in place."""
    out, aside = w["out"], aside_path(w["out"])
    if stage in ("add", "ids", "meta"):
        assert (out / "index_meta.json").read_bytes() == old_meta and not aside.exists()
        (tmp,) = _temporary_dirs(w)
        assert not (tmp / "index_meta.json").exists()
        assert (tmp / "index.00000-of-00001.faiss").exists() == (stage != "add")
        assert (tmp / "docids.00000-of-00001.txt").exists() == (stage == "meta")
    elif stage == "swap":
        assert (out / "index_meta.json").read_bytes() != old_meta and not aside.exists()
        (tmp,) = _temporary_dirs(w)
        assert (tmp / "index_meta.json").read_bytes() == old_meta  # the old index, exchanged, not deleted
    elif stage == "gap":
        assert not out.exists() and (aside / "index_meta.json").read_bytes() == old_meta
        (tmp,) = _temporary_dirs(w)
        assert (tmp / "index_meta.json").exists()
    else:
        assert (out / "index_meta.json").read_bytes() != old_meta
        assert aside.exists() and not list(aside.glob("*.faiss"))


@pytest.mark.parametrize(
    "stage, survivor",
    [("add", "old"), ("ids", "old"), ("meta", "old"), ("swap", "new"), ("gap", "old"), ("cleanup", "new")],
)
def test_kill_during_an_overwriting_build_leaves_the_old_or_the_new_index(world, stage, survivor):
    w = world
    assert _index(w["old"], w["out"]) == 0
    assert _search(w, w["out"]) == w["old_hits"]
    old_meta = (w["out"] / "index_meta.json").read_bytes()
    child = _start_builder(w, stage)
    try:
        _assert_unfinished(w, stage, old_meta)
    finally:
        _kill(child)
    assert _search_library(w, w["out"]) == w[f"{survivor}_hits"]
    if stage != "gap":  # (with the directory missing, the command line stops at its own --index check)
        assert _search(w, w["out"]) == w[f"{survivor}_hits"]
    assert _index(w["new"], w["out"]) == 0  # the rerun: the lock died with the builder, leftovers go
    assert _search(w, w["out"]) == w["new_hits"]
    assert not aside_path(w["out"]).exists() and _temporary_dirs(w) == []


def test_a_planted_mix_of_two_builds_is_refused(world, capsys):
    w = world
    old, new = w["tmp"] / "index_old", w["tmp"] / "index_new"
    assert _index(w["old"], old) == 0 and _index(w["new"], new) == 0
    name = "index.00000-of-00001.faiss"
    assert (old / name).stat().st_size == (new / name).stat().st_size  # sizes alone cannot tell them apart
    # What the mix would answer if it were read: neither index's results.
    mixed = load_index(new)[0].index
    queries = np.load(w["queries"] / "emb.00000-of-00001.npy")
    _, hits = search_shards([IndexShard(mixed, w["doc_ids"])], queries, HITS)
    assert hits != list(w["old_hits"].values()) and hits != list(w["new_hits"].values())
    shutil.copyfile(new / name, old / name)  # new .faiss next to the old ids and the old index_meta.json
    capsys.readouterr()
    assert _search(w, old) is None
    error = _one_error(capsys)
    assert f"{old / name}: SHA-256 differs from index_meta.json's" in error and "rebuild it" in error


def test_a_second_concurrent_build_is_refused(world, capsys):
    w = world
    assert _index(w["old"], w["out"]) == 0
    child = _start_builder(w, "add")  # holds the index's lock, paused mid-build
    try:
        capsys.readouterr()
        assert _index(w["new"], w["out"]) == 2
        error = _one_error(capsys)
        assert f"output directory {w['out']} is in use by pid {child.pid}" in error
    finally:
        _kill(child)
    assert _search(w, w["out"]) == w["old_hits"]


def test_ivf_with_too_few_vectors_is_refused_before_anything_is_written(world, capsys):
    w = world
    before = sorted(p.name for p in w["tmp"].iterdir())
    capsys.readouterr()
    assert _index(w["old"], w["out"], "--factory", "IVF4096,Flat") == 2
    error = _one_error(capsys)
    assert (
        "IVF4096 needs >= 4096 training vectors (159744 = 39 x nlist recommended), the embeddings have 300: "
        "use a smaller nlist or Flat/HNSW" in error
    )
    assert sorted(p.name for p in w["tmp"].iterdir()) == before  # no index dir, no lock, no temporary dir
    assert _index(w["old"], w["out"], "--factory", "IVF16,PQ8", "--train-size", "200") == 2
    error = _one_error(capsys)
    assert "PQ8 with 256 centroids per sub-quantizer needs >= 256 training vectors" in error
    assert "the embeddings have 300 and train_size samples 200 of them" in error
    assert sorted(p.name for p in w["tmp"].iterdir()) == before


def test_queries_of_another_model_or_dimension_are_refused(world, capsys):
    w = world
    assert _index(w["old"], w["out"]) == 0
    queries = np.load(w["queries"] / "emb.00000-of-00001.npy")
    qids = list(w["old_hits"])
    other = _write_emb(w["tmp"] / "queries_m2", qids, queries, "m2", "query")
    narrow = _write_emb(w["tmp"] / "queries_d8", qids, queries[:, :8].copy(), "m1", "query")
    capsys.readouterr()
    for index in (w["out"], w["old"]):  # a FAISS index, and exact search over the embeddings dir
        assert _search(w, index, other) is None
        error = _one_error(capsys)
        assert "query embeddings come from model 'model-m2' (fingerprint m2)" in error
        assert "documents were encoded with 'model-m1' (fingerprint m1)" in error
        assert _search(w, index, narrow) is None
        assert f"{index}: query vectors have dim 8 but the index has dim 16" in _one_error(capsys)
        assert _search(w, index) == w["old_hits"]  # the same model's queries are searched


def test_index_meta_records_what_made_the_index(world):
    w = world
    assert _index(w["old"], w["out"], "--factory", "HNSW8") == 0
    meta = json.loads((w["out"] / "index_meta.json").read_text())
    emb_meta = json.loads((w["old"] / "meta.json").read_text())
    assert meta["factory"] == "HNSW8" and meta["embeddings_meta"] == emb_meta
    assert meta["embeddings_meta"]["model_fingerprint"] == "m1" and meta["count"] == 300
