"""BEIR SciFact test (300 claims, 5,183 abstracts): nDCG@10 and R@100, documents as title + " " + text.

    python eval/beir_scifact.py --model MODEL_DIR

The corpus is converted once from ../shared/data/scifact/scifact.hf-csv.zip into BEIR JSONL
(``outputs/scifact/corpus.jsonl``, see eval/prepare_scifact.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from eval_common import data_root, main
from prepare_scifact import prepare_scifact

DATA = data_root() / "scifact"
PREPARED = Path("outputs") / "scifact"
DEFAULTS = {
    "collection": str(PREPARED / "corpus.jsonl"),
    "topics": str(DATA / "topics.beir-v1.0.0-scifact.test.tsv.gz"),
    "qrels": str(DATA / "qrels.beir-v1.0.0-scifact.test.txt"),
    "measures": "beir",
}

if __name__ == "__main__":
    if not (PREPARED / "corpus.jsonl").exists() and "--collection" not in sys.argv:
        prepare_scifact(DATA / "scifact.hf-csv.zip", PREPARED)
    main("beir_scifact", DEFAULTS, __doc__.splitlines()[0], sys.argv[1:])
