"""TREC DL 2019 passage: encode the collection, index, retrieve the 43 topics, score nDCG@10 etc.

    python eval/trec_dl19.py --model MODEL_DIR
    python eval/trec_dl19.py --model MODEL_DIR --collection /data/msmarco/collection.tsv --factory IVF65536,PQ64

By default the collection is the 31,490-passage subset in ../shared/data (every judged DL19 passage plus the
BM25 top-100): a pooled, re-ranking-style benchmark whose numbers are NOT comparable to full-collection
figures. Pass the official 8.8M ``collection.tsv`` to get those. The shipped BM25 run is scored alongside.
"""

from __future__ import annotations

import sys

from eval_common import data_root, main

DATA = data_root() / "msmarco-passage"
DEFAULTS = {
    "collection": str(DATA / "collection.subset.tsv"),
    "topics": str(DATA / "topics.dl19-passage.txt"),
    "qrels": str(DATA / "qrels.dl19-passage.txt"),
    "measures": "nDCG@10 RR(rel=2)@10 R(rel=2)@100 R(rel=2)@1000",
    "baselines": [f"BM25 (shipped run, top-100)={DATA / 'runs' / 'rank_llm.BM25.trec_results_dl19.txt'}"],
}

if __name__ == "__main__":
    main("trec_dl19", DEFAULTS, __doc__.splitlines()[0], sys.argv[1:])
