"""BEIR SciFact test (300 claims, 5,183 abstracts): nDCG@10 and R@100, documents as title + " " + text.

    python eval/beir_scifact.py --model MODEL_DIR

Unless ``--collection`` names another, the corpus is converted on first use from
../shared/data/scifact/scifact.hf-csv.zip into BEIR JSONL (``outputs/scifact/corpus.jsonl``, see
eval/prepare_scifact.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import eval_common
from prepare_scifact import prepare_scifact

PREPARED = Path("outputs") / "scifact"
CORPUS = PREPARED / "corpus.jsonl"


def _convert_corpus(args: argparse.Namespace) -> None:
    """Write the default corpus from the SciFact zip when it is the one asked for and not there yet."""
    if args.collection == str(CORPUS) and not CORPUS.exists():
        prepare_scifact(eval_common.data_root() / "scifact" / "scifact.hf-csv.zip", PREPARED)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the eval (``argv``: the command line; default ``sys.argv[1:]``); returns the report it wrote."""
    data = eval_common.data_root() / "scifact"
    name = "beir-v1.0.0-scifact.test"
    defaults = eval_common.anserini_defaults(data, name, "beir", collection=CORPUS, topics_suffix=".tsv.gz")
    return eval_common.main("beir_scifact", defaults, __doc__.splitlines()[0], argv, prepare=_convert_corpus)


if __name__ == "__main__":
    main()
