"""MS MARCO passage dev (small, 6,980 queries): MRR@10 (RR@10) and R@1000, the official convention.

    python eval/msmarco_dev.py --model MODEL_DIR --collection /data/msmarco/collection.tsv

Queries missing from the run count 0 (the official scorer divides by all 6,980). The default collection is the
31,490-passage subset in ../shared/data, which holds only 44 of the 7,433 relevant dev passages: the script
runs there as a smoke test, but the numbers mean something only with the full 8.8M collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import eval_common


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the eval (``argv``: the command line; default ``sys.argv[1:]``); returns the report it wrote."""
    data = eval_common.data_root() / "msmarco-passage"
    split, subset = "msmarco-passage.dev-subset", data / "collection.subset.tsv"
    defaults = eval_common.anserini_defaults(data, split, "msmarco-dev", collection=subset)
    return eval_common.main("msmarco_dev", defaults, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
