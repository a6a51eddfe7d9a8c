"""TREC DL 2019 passage: encode the collection, index, retrieve the 43 topics, score nDCG@10 etc.

    python eval/trec_dl19.py --model MODEL_DIR
    python eval/trec_dl19.py --model MODEL_DIR --collection /data/msmarco/collection.tsv \\
        --factory IVF65536,PQ64

By default the collection is the 31,490-passage subset in ../shared/data (every DL19 passage judged relevant
plus the BM25 top-100): a pooled, re-ranking-style benchmark whose numbers are NOT comparable to
full-collection figures. Pass the official 8.8M ``collection.tsv`` to get those. The shipped BM25 run is
scored alongside.
"""

from __future__ import annotations

from collections.abc import Sequence

import eval_common

MEASURES = "nDCG@10 RR(rel=2)@10 R(rel=2)@100 R(rel=2)@1000"


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the eval (``argv``: the command line; default ``sys.argv[1:]``); returns the report it wrote."""
    data = eval_common.data_root() / "msmarco-passage"
    bm25 = {"BM25 (shipped run, top-100)": data / "runs" / "rank_llm.BM25.trec_results_dl19.txt"}
    subset = data / "collection.subset.tsv"
    defaults = eval_common.anserini_defaults(
        data, "dl19-passage", MEASURES, collection=subset, baselines=bm25
    )
    return eval_common.main("trec_dl19", defaults, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
