"""Exact torch search and the tie-break against brute-force numpy oracles (seeded random data; no faiss)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import K, assert_ties_present, brute_force, gauss_data, int_data

from dualenc.retrieval import topk as topk_mod
from dualenc.retrieval.topk import exact_search_torch


@pytest.mark.parametrize("data", [int_data, gauss_data])
@pytest.mark.parametrize("by_doc_id", [True, False])
def test_exact_search_torch_equals_brute_force(data, by_doc_id):
    queries, docs, doc_ids = data()
    keys = np.asarray(doc_ids) if by_doc_id else np.arange(len(doc_ids))
    ref_scores, ref_rows = brute_force(queries, docs, keys, K)
    shards = [docs[:700], docs[700:1500], docs[1500:]]  # blocks of 300 never cross a shard
    scores, rows = exact_search_torch(
        torch.from_numpy(queries),
        shards,
        K,
        block_size=300,
        batch_size=7,
        doc_ids=doc_ids if by_doc_id else None,
    )
    np.testing.assert_array_equal(rows, ref_rows)
    if data is int_data:
        assert_ties_present(ref_scores)
        np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    else:
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6 * np.abs(ref_scores).max())


def test_tie_refetch_cap_logs_a_warning(monkeypatch, caplog):
    queries, docs, doc_ids = int_data(num_docs=500)
    docs[100:160] = queries[0]
    monkeypatch.setattr(topk_mod, "MAX_FETCH_FACTOR", 1)
    with caplog.at_level(logging.WARNING, logger="dualenc.retrieval.topk"):
        exact_search_torch(queries[:1], docs, 5, doc_ids=doc_ids)
    assert "ties deeper than 21 candidates" in caplog.text


def test_exact_search_torch_works_without_faiss():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["faiss"] = None  # any `import faiss` now raises ImportError
        import numpy as np
        from dualenc.retrieval.topk import exact_search_torch
        docs = np.eye(4, dtype=np.float32)
        scores, rows = exact_search_torch(docs[[2]], docs, 2)
        assert rows.tolist() == [[2, 0]] and scores.tolist() == [[1.0, 0.0]], (rows, scores)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_search_torch_on_cuda():
    queries, docs, doc_ids = int_data()
    ref_scores, ref_rows = brute_force(queries, docs, np.asarray(doc_ids), K)
    scores, rows = exact_search_torch(queries, docs, K, device="cuda", block_size=300, doc_ids=doc_ids)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    queries, docs, doc_ids = gauss_data()
    ref_scores, ref_rows = brute_force(queries, docs, np.asarray(doc_ids), K)
    scores, rows = exact_search_torch(queries, docs, K, device="cuda", dtype=torch.float16)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=0.05)  # fp16 inputs: ~1e-3 relative
    assert np.mean(rows == ref_rows) > 0.9
