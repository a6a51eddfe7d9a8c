"""ANN recall and speed vs exact search on real embeddings: Flat, IVF, HNSW, IVF-PQ (FAISS, inner product).

    python bench/index_recall.py --corpus outputs/zeroshot/dl19/corpus --queries outputs/bench/dev-queries
    python bench/index_recall.py --corpus EMB_DIR --queries QEMB_DIR --factories "IVF256,Flat" HNSW32 --k 100

``--corpus`` and ``--queries`` are embeddings directories (``dualenc encode --collection`` / ``--topics``).
For each factory string the index is built once (train + add timed), then searched with each parameter
setting; recall@k is the fraction of the exact top-k (``IndexFlatIP``) found by the ANN index, averaged over
queries (faiss's ``knn_intersection_measure``). All rows are measured side by side in one run. Output: a
table and a JSON file.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
from bench_common import print_table, write_report

DEFAULT_FACTORIES = ["Flat", "IVF256,Flat", "HNSW32", "IVF256,PQ32"]
DEFAULT_PARAMS = {
    "IVF256,Flat": ["nprobe=1", "nprobe=8", "nprobe=32"],
    "HNSW32": ["efSearch=16", "efSearch=64", "efSearch=256"],
    "IVF256,PQ32": ["nprobe=8", "nprobe=32"],
}


def _load(emb_dir: str) -> np.ndarray:
    from dualenc.io.embeddings import load_embeddings

    return np.concatenate([np.asarray(s.emb, dtype=np.float32) for s in load_embeddings(emb_dir)])


def measure(
    corpus: np.ndarray, queries: np.ndarray, factories: list[str], k: int, threads: int | None
) -> list[dict]:
    import faiss
    from faiss.contrib.evaluation import knn_intersection_measure

    from dualenc.retrieval.index import build_index, set_search_params

    if threads:
        faiss.omp_set_num_threads(threads)
    exact = faiss.IndexFlatIP(corpus.shape[1])
    exact.add(corpus)
    _, truth = exact.search(queries, k)  # (Q, k)
    rows = []
    for factory in factories:
        start = time.perf_counter()
        index = build_index(corpus, factory, train_size=min(len(corpus), 100_000))
        build_s = time.perf_counter() - start
        size_mib = len(faiss.serialize_index(index)) / 2**20
        for params in DEFAULT_PARAMS.get(factory, [None]):
            set_search_params(index, params)
            start = time.perf_counter()
            _, found = index.search(queries, k)  # (Q, k)
            search_s = time.perf_counter() - start
            rows.append(
                {
                    "factory": factory,
                    "params": params or "-",
                    f"recall@{k}": knn_intersection_measure(found, truth),
                    "build_s": build_s,
                    "search_ms_per_query": 1000 * search_s / len(queries),
                    "index_mib": size_mib,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="embeddings dir of the collection")
    p.add_argument("--queries", required=True, help="embeddings dir of the queries")
    p.add_argument("--factories", nargs="+", default=DEFAULT_FACTORIES)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: all)")
    p.add_argument("--out", default="bench/results/index_recall_cpu.json")
    args = p.parse_args(argv)
    corpus, queries = _load(args.corpus), _load(args.queries)
    rows = measure(corpus, queries, args.factories, args.k, args.threads)
    title = f"{len(corpus)} docs x {len(queries)} queries, dim {corpus.shape[1]}"
    report = {
        "config": vars(args),
        "num_docs": len(corpus),
        "num_queries": len(queries),
        "rows": rows,
        "table": print_table(rows, title),
        "python_platform": platform.platform(),
    }
    return write_report(args.out, report)


if __name__ == "__main__":
    main(sys.argv[1:])
