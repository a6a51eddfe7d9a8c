"""MS MARCO passage dev (small, 6,980 queries): MRR@10 (RR@10) and R@1000, the official convention.

    python eval/msmarco_dev.py --model MODEL_DIR --collection /data/msmarco/collection.tsv

Queries missing from the run count 0 (the official scorer divides by all 6,980). The default collection is the
31,490-passage subset in ../shared/data, which holds only 44 of the 7,433 relevant dev passages: the script runs
there as a smoke test, but the numbers mean something only with the full 8.8M collection.
"""

from __future__ import annotations

import sys

from eval_common import data_root, main

DATA = data_root() / "msmarco-passage"
DEFAULTS = {
    "collection": str(DATA / "collection.subset.tsv"),
    "topics": str(DATA / "topics.msmarco-passage.dev-subset.txt"),
    "qrels": str(DATA / "qrels.msmarco-passage.dev-subset.txt"),
    "measures": "msmarco-dev",
}

if __name__ == "__main__":
    main("msmarco_dev", DEFAULTS, __doc__.splitlines()[0], sys.argv[1:])
