"""FAISS indexes (and exact torch search where both must agree) against brute-force numpy oracles."""

from __future__ import annotations

import hashlib
import json

import faiss
import numpy as np
import pytest
import torch
from helpers import K, assert_ties_present, brute_force, gauss_data, ids_of, int_data

from dualenc.errors import InputError
from dualenc.io.embeddings import write_meta, write_shard
from dualenc.io.provenance import dir_fingerprint
from dualenc.retrieval import index as index_mod
from dualenc.retrieval import topk as topk_mod
from dualenc.retrieval.index import IndexShard, build_index, check_trainable, search_shards, set_search_params
from dualenc.retrieval.index_dir import index_from_embeddings, load_index, save_index
from dualenc.retrieval.topk import exact_search_torch


def test_flat_equals_brute_force_exactly_with_ties():
    queries, docs, doc_ids = int_data()
    ref_scores, ref_rows = brute_force(queries, docs, np.asarray(doc_ids), K)
    assert_ties_present(ref_scores)
    scores, hits = search_shards([IndexShard(build_index(docs), doc_ids)], queries, K, batch_size=16)
    assert hits == ids_of(ref_rows, doc_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    assert scores.dtype == np.float32


def test_flat_gaussian_ids_equal_scores_close():
    queries, docs, doc_ids = gauss_data()
    ref_scores, ref_rows = brute_force(queries, docs, np.asarray(doc_ids), K + 1)
    # faiss sums float32 products in its own order: measured 2.8e-6 abs error vs float64 at |score| <= 39.
    tol = 1e-6 * np.abs(ref_scores).max()
    # Seed chosen so no two neighbouring scores are within 10 tol: rounding cannot swap the ids.
    assert -np.diff(ref_scores, axis=1).max() > 10 * tol
    scores, hits = search_shards([IndexShard(build_index(docs), doc_ids)], queries, K)
    assert hits == ids_of(ref_rows[:, :K], doc_ids)
    np.testing.assert_allclose(scores, ref_scores[:, :K], rtol=0, atol=tol)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_ties_deeper_than_the_margin_are_refetched(engine):
    """60 identical best docs > k + TIE_MARGIN: the 5 smallest ids must come back, whatever faiss/topk cut."""
    queries, docs, doc_ids = int_data(num_docs=500)
    docs[100:160] = queries[0]
    keys = np.asarray(doc_ids)
    ref_scores, ref_rows = brute_force(queries, docs, keys, 5)
    assert len(set(ref_scores[0])) == 1 and 60 > 5 + topk_mod.TIE_MARGIN
    if engine == "faiss":
        scores, hits = search_shards([IndexShard(build_index(docs), doc_ids)], queries, 5)
    else:
        scores, rows = exact_search_torch(queries, docs, 5, block_size=128, doc_ids=doc_ids)
        hits = ids_of(rows, doc_ids)
    assert hits == ids_of(ref_rows, doc_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_sharded_result_heap_merge_equals_one_flat_index():
    queries, docs, doc_ids = int_data(seed=3)
    cuts = [0, 523, 1400, 2000]
    shards = [
        IndexShard(build_index(docs[a:b], add_batch_size=128), doc_ids[a:b])
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    merged_scores, merged_hits = search_shards(shards, queries, K)
    flat_scores, flat_hits = search_shards([IndexShard(build_index(docs), doc_ids)], queries, K)
    assert merged_hits == flat_hits
    np.testing.assert_array_equal(merged_scores, flat_scores)
    assert_ties_present(flat_scores)


def test_fewer_docs_than_k_pads():
    queries, docs, doc_ids = int_data(num_docs=30)
    scores, hits = search_shards(
        [IndexShard(build_index(docs[:10]), doc_ids[:10]), IndexShard(build_index(docs[10:]), doc_ids[10:])],
        queries,
        40,
    )
    assert scores.shape == (len(queries), 40) and all(len(h) == 30 for h in hits)
    assert np.isneginf(scores[:, 30:]).all() and np.isfinite(scores[:, :30]).all()
    t_scores, rows = exact_search_torch(queries, docs, 40, doc_ids=doc_ids)
    assert (rows[:, 30:] == -1).all() and ids_of(rows, doc_ids) == hits
    np.testing.assert_array_equal(t_scores, scores)


# ----------------------------------------------------------------------------------- approximate indexes


@pytest.fixture(scope="module")
def clustered():
    """20k x 64 vectors around 100 Gaussian centres (+ unit noise), 200 queries, and the exact top 100."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 64)).astype(np.float32)
    docs = (centres[rng.integers(0, 100, 20_000)] + rng.standard_normal((20_000, 64))).astype(np.float32)
    queries = (centres[rng.integers(0, 100, 200)] + rng.standard_normal((200, 64))).astype(np.float32)
    doc_ids = [f"c{i}" for i in range(len(docs))]
    _, flat_hits = search_shards([IndexShard(build_index(docs), doc_ids)], queries, 100)
    return queries, docs, doc_ids, flat_hits


def recall_at_100(hits: list[list[str]], flat_hits: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(hits, flat_hits, strict=True)]))


def test_approximate_index_recall(clustered):
    """Measured (faiss-cpu 1.15.1): IVF nprobe=1 0.93, nprobe=8 0.986, nprobe=64 1.0; HNSW32 ef=128 0.987;
    IVF64,PQ8 nprobe=8 0.73."""
    queries, docs, doc_ids, flat_hits = clustered
    ivf = [IndexShard(build_index(docs, "IVF64,Flat", train_size=10_000), doc_ids)]
    recall = {
        p: recall_at_100(search_shards(ivf, queries, 100, params=p)[1], flat_hits)
        for p in ("nprobe=1", "nprobe=8", "nprobe=64")
    }
    assert recall["nprobe=64"] == 1.0  # every list scanned: exact
    assert 0.95 <= recall["nprobe=8"] < 1.0 and recall["nprobe=1"] < recall["nprobe=8"]
    hnsw = [IndexShard(build_index(docs, "HNSW32"), doc_ids)]
    assert recall_at_100(search_shards(hnsw, queries, 100, params="efSearch=128")[1], flat_hits) >= 0.95
    # "np": no polysemous training (only useful with Hamming thresholds; it costs seconds here).
    pq = [IndexShard(build_index(docs, "IVF64,PQ8np", train_size=10_000), doc_ids)]
    assert recall_at_100(search_shards(pq, queries, 100, params="nprobe=8")[1], flat_hits) >= 0.65


def test_search_params_take_effect_and_bad_params_are_input_errors(clustered):
    queries, docs, doc_ids, _ = clustered
    ivf = build_index(docs[:5000], "IVF16,Flat")
    set_search_params(ivf, "nprobe=5")
    assert faiss.extract_index_ivf(ivf).nprobe == 5
    hnsw = build_index(docs[:500], "HNSW8")
    set_search_params(hnsw, " efSearch = 77 ")
    assert hnsw.hnsw.efSearch == 77
    for params, problem in [
        ("nprobe", "bad search parameter 'nprobe'"),
        ("nprobe=x", "expected name=number"),
    ]:
        with pytest.raises(InputError, match=problem):
            set_search_params(ivf, params)
    with pytest.raises(InputError, match=r"cannot set 'efSearch=3' on a IndexIVFFlat: .*efSearch"):
        set_search_params(ivf, "efSearch=3")


# ---------------------------------------------------------------------------------------------- index files


def test_save_load_round_trip_equals_in_memory(tmp_path, clustered):
    queries, docs, doc_ids, _ = clustered
    index = build_index(docs[:4000], "IVF16,Flat")
    expected = search_shards([IndexShard(index, doc_ids[:4000])], queries, K, params="nprobe=4")
    save_index(tmp_path / "idx", index, doc_ids[:4000], meta={"factory": "IVF16,Flat"})
    loaded = load_index(tmp_path / "idx")
    assert len(loaded) == 1 and loaded[0].doc_ids == doc_ids[:4000]
    got = search_shards(loaded, queries, K, params="nprobe=4")
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == expected[1]
    meta = json.loads((tmp_path / "idx" / "index_meta.json").read_text())
    assert meta["factory"] == "IVF16,Flat" and meta["dim"] == 64 and meta["count"] == 4000
    assert meta["num_shards"] == 1 and meta["metric"] == "inner_product"
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "docids.00000-of-00001.txt",
        "index.00000-of-00001.faiss",
        "index_meta.json",
    ]


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    queries, docs, doc_ids = int_data(num_docs=100)
    index = build_index(docs)
    save_index(tmp_path, index, doc_ids)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(index, path):
        with open(path, "wb") as fh:
            fh.write(b"half an index")
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path, build_index(docs[:50]), doc_ids[:50])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp files
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path / "new", index, doc_ids)
    assert list((tmp_path / "new").iterdir()) == []


def test_load_index_errors(tmp_path):
    _, docs, doc_ids = int_data(num_docs=100)
    with pytest.raises(InputError, match="no index_meta.json"):
        load_index(tmp_path)
    save_index(tmp_path, build_index(docs[:60]), doc_ids[:60], shard=0, num_shards=2)
    with pytest.raises(InputError, match="missing index shard file") as err:
        load_index(tmp_path)
    assert err.value.path.endswith("index.00001-of-00002.faiss")
    save_index(tmp_path, build_index(docs[60:]), doc_ids[60:], shard=1, num_shards=2)
    assert json.loads((tmp_path / "index_meta.json").read_text())["count"] == 100
    assert [len(s.doc_ids) for s in load_index(tmp_path)] == [60, 40]
    ids_file = tmp_path / "docids.00001-of-00002.txt"
    size = ids_file.stat().st_size
    ids_file.write_text("\n".join(doc_ids[60:99]) + "\n")  # a line short
    shorter = size - len(doc_ids[99]) - 1
    with pytest.raises(InputError, match=f"{shorter} bytes but index_meta.json records {size}") as err:
        load_index(tmp_path)
    assert err.value.path.endswith("docids.00001-of-00002.txt")
    swapped = [doc_ids[61], doc_ids[60], *doc_ids[62:100]]  # same bytes, two rows' ids exchanged
    ids_file.write_text("\n".join(swapped) + "\n")
    assert ids_file.stat().st_size == size
    with pytest.raises(InputError, match="SHA-256 differs from index_meta.json's: .* rebuild it") as err:
        load_index(tmp_path)
    assert err.value.path.endswith("docids.00001-of-00002.txt")
    meta = json.loads((tmp_path / "index_meta.json").read_text())
    del meta["files"]  # as an index written before sizes and checksums were recorded
    (tmp_path / "index_meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="records no file sizes or checksums"):
        load_index(tmp_path)


def test_bad_inputs_are_input_errors(tmp_path):
    queries, docs, doc_ids = int_data(num_docs=100)
    with pytest.raises(InputError, match="bad faiss factory string 'IVFx,Flat': could not parse"):
        build_index(docs, "IVFx,Flat")
    with pytest.raises(InputError, match="embedding shard 1 has dim 8 but shard 0 has dim 16"):
        build_index([docs, docs[:, :8]])
    bad = docs.copy()
    bad[37, 3] = np.nan
    with pytest.raises(InputError, match=r"embedding row 37 \(0-based\) of shard 0 contains NaN or inf"):
        build_index(bad)
    bad[37, 3], bad[90, 0] = 0.0, np.inf
    with pytest.raises(InputError, match="row 40 .* of shard 1 contains NaN or inf"):
        build_index([bad[:50], bad[50:]], "IVF4,Flat", train_size=20)  # inf outside the training sample too
    with pytest.raises(InputError, match="use_gpu=True"):
        build_index(docs, use_gpu=True)
    shard = IndexShard(build_index(docs), doc_ids)
    with pytest.raises(InputError, match=r"queries have shape \(3, 8\); the index expects \(Q, 16\)"):
        search_shards([shard], queries[:3, :8], 5)
    nan_queries = queries[:3].copy()
    nan_queries[1, 0] = np.nan
    with pytest.raises(InputError, match="query row 1 contains NaN or inf"):
        search_shards([shard], nan_queries, 5)
    with pytest.raises(InputError, match="query row 1 contains NaN or inf"):
        exact_search_torch(torch.from_numpy(nan_queries), docs, 5)
    with pytest.raises(InputError, match=r"queries have shape \(3, 8\); the index expects \(Q, 16\)"):
        exact_search_torch(queries[:3, :8], docs, 5)
    with pytest.raises(InputError, match="k must be >= 1"):
        search_shards([shard], queries, 0)
    with pytest.raises(InputError, match="2 doc ids for an index with 100 vectors"):
        save_index(tmp_path, shard.index, doc_ids[:2])


def test_index_from_embeddings(tmp_path):
    queries, docs, doc_ids = int_data(num_docs=900)
    cuts = [0, 400, 900]
    for p in range(2):
        write_shard(
            tmp_path / "emb",
            p,
            2,
            doc_ids[cuts[p] : cuts[p + 1]],
            docs[cuts[p] : cuts[p + 1]].astype(np.float16),
        )
    write_meta(tmp_path / "emb", {"dim": 16, "dtype": "float16", "num_shards": 2, "count": 900})
    ref_scores, ref_rows = brute_force(queries, docs, np.asarray(doc_ids), K)
    for per_shard, num in [(False, 1), (True, 2)]:
        out = tmp_path / f"index_{per_shard}"
        index_from_embeddings(tmp_path / "emb", out, "Flat", per_shard=per_shard, add_batch_size=64)
        shards = load_index(out)
        assert len(shards) == num
        scores, hits = search_shards(shards, queries, K)
        assert hits == ids_of(ref_rows, doc_ids)
        np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
        meta = json.loads((out / "index_meta.json").read_text())
        assert (
            meta["factory"] == "Flat"
            and meta["count"] == 900
            and meta["embeddings_meta"]["dtype"] == "float16"
        )


def test_index_from_embeddings_names_the_file_with_nan(tmp_path):
    _, docs, doc_ids = int_data(num_docs=100)
    bad = docs.copy()
    bad[57] = np.nan
    write_shard(tmp_path, 0, 2, doc_ids[:50], docs[:50])
    write_shard(tmp_path, 1, 2, doc_ids[50:], bad[50:])
    write_meta(tmp_path, {"dim": 16, "dtype": "float32", "num_shards": 2, "count": 100})
    with pytest.raises(InputError) as err:
        index_from_embeddings(tmp_path, tmp_path / "index")
    assert (
        str(err.value)
        == f"{tmp_path / 'emb.00001-of-00002.npy'}: embedding row 7 (0-based) of shard 1 contains NaN or inf"
    )


def test_too_few_training_vectors_is_one_input_error_before_training(monkeypatch):
    _, docs, _ = int_data(num_docs=120)
    sampled = []  # the training sample is drawn right before k-means runs

    def sample_rows(shards, size, *args):
        sampled.append(size)
        return sample_rows_orig(shards, size, *args)

    sample_rows_orig = index_mod._sample_rows
    monkeypatch.setattr(index_mod, "_sample_rows", sample_rows)
    cases = [
        (
            "IVF4096,Flat",
            {},
            r"IVF4096 needs >= 4096 training vectors \(159744 = 39 x nlist recommended\), "
            r"the embeddings have 120: use a smaller nlist or Flat/HNSW",
        ),
        (
            "IVF16,Flat",
            {"train_size": 10},
            r"the embeddings have 120 and train_size samples 10 of them: "
            r"use a smaller nlist \(or a larger train_size\)",
        ),
        ("IVF8,PQ4", {}, r"PQ4 with 256 centroids per sub-quantizer needs >= 256 training vectors"),
        ("OPQ4,IVF8,PQ4", {}, r"PQ4 with 256 centroids"),
    ]
    for factory, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            build_index(docs, factory, **kwargs)
        with pytest.raises(InputError, match=message):
            check_trainable(factory, 16, 120, kwargs.get("train_size", 262_144))
    assert sampled == []  # refused before any training
    for factory in ("IVF8,PQ4x4", "IVF100,Flat", "HNSW32", "Flat"):  # 16 and 100 centroids fit in 120 points
        check_trainable(factory, 16, 120)
    assert build_index(docs, "IVF8,PQ4x4").ntotal == 120 and sampled == [120]


def test_reindexing_replaces_the_whole_directory_and_records_its_sources(tmp_path):
    _, docs, doc_ids = int_data(num_docs=300)
    for p, (a, b) in enumerate([(0, 100), (100, 300)]):
        write_shard(tmp_path / "emb", p, 2, doc_ids[a:b], docs[a:b])
    emb_meta = {"dim": 16, "dtype": "float32", "num_shards": 2, "count": 300, "model_fingerprint": "abc"}
    write_meta(tmp_path / "emb", emb_meta)
    out = tmp_path / "index"
    index_from_embeddings(tmp_path / "emb", out, "Flat")
    index_from_embeddings(tmp_path / "emb", out, "Flat", per_shard=True)  # 2 shards replace the 1
    names = ["docids.00000-of-00002.txt", "docids.00001-of-00002.txt", "index.00000-of-00002.faiss"]
    assert sorted(p.name for p in out.iterdir()) == [*names, "index.00001-of-00002.faiss", "index_meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "emb", "index"]  # no aside, no tmp
    meta = json.loads((out / "index_meta.json").read_text())
    assert (
        meta["embeddings_meta"] == emb_meta
        and meta["per_shard"]
        and meta["shard_counts"]
        == {
            "00000-of-00002": 100,
            "00001-of-00002": 200,
        }
    )
    assert meta["embeddings_fingerprint"] == dir_fingerprint(tmp_path / "emb")
    for name, record in meta["files"].items():
        data = (out / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    before = {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()}
    for target in (tmp_path / "emb", tmp_path):  # not index directories: never replaced
        with pytest.raises(InputError, match="exists and is not an index directory"):
            index_from_embeddings(tmp_path / "emb", target, "Flat")
    assert {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()} == before
