"""Convert the SciFact release shipped as ``scifact.hf-csv.zip`` into BEIR-style files.

    python eval/prepare_scifact.py ../shared/data/scifact/scifact.hf-csv.zip outputs/scifact

The zip holds ``corpus_train.csv`` (``doc_id, title, abstract, structured``; the abstract is a printed numpy
array of sentence strings) and ``claims_{train,validation,test}.csv`` (one row per claim × evidence
document). BEIR's SciFact *test* split is SciFact's validation claims (300 queries), whose topics and qrels
ship separately as Anserini files; BEIR's *train* split is the 809 training claims with their 919
(claim, cited abstract) pairs. This script writes, with the counts for the shipped zip::

    OUT_DIR/corpus.jsonl            {"_id", "title", "text"} (5,183); text = abstract sentences joined by one
                                    space, as BEIR joins them
    OUT_DIR/queries.train-all.tsv   qid<TAB>claim: the BEIR train claims (809)
    OUT_DIR/qrels.train-all.txt     "qid 0 docid 1" (919)
    OUT_DIR/queries.train.tsv       the train claims minus the dev ones (729), qrels.train.txt (822)
    OUT_DIR/queries.dev.tsv         ~10% of them chosen by a hash of the claim id (80), qrels.dev.txt (97)

The dev claims are for model selection without touching the test claims. The conversion is deterministic;
files are written atomically.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import os
import sys
import tokenize
import zipfile
from collections.abc import Sequence
from pathlib import Path

from dualenc.errors import InputError
from dualenc.io import atomic


def parse_sentences(printed: str) -> list[str]:
    """Sentences from a printed numpy string array such as ``"['First.'\\n 'Second.']"``.

    ``ast.literal_eval`` would concatenate the adjacent literals into one string, so the string tokens are
    read one by one with :mod:`tokenize` instead.
    """
    tokens = tokenize.generate_tokens(io.StringIO(printed).readline)
    return [ast.literal_eval(tok.string) for tok in tokens if tok.type == tokenize.STRING]


def _rows(archive: zipfile.ZipFile, name: str, zip_path: str) -> list[dict[str, str]]:
    try:
        text = archive.read(name).decode("utf-8")
    except KeyError:
        raise InputError(f"missing member {name!r}", path=zip_path) from None
    csv.field_size_limit(1 << 30)
    return list(csv.DictReader(io.StringIO(text)))


def _is_dev(query_id: str, fraction: float) -> bool:
    """Deterministic dev split by a hash of the claim id (stable across Python runs and platforms)."""
    digest = hashlib.sha256(query_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare_scifact(
    zip_path: str | os.PathLike, out_dir: str | os.PathLike, *, dev_fraction: float = 0.1
) -> dict[str, int]:
    """Write corpus.jsonl, the train claims (all, and split into train/dev) and their qrels; return counts.

    Files: ``queries.train-all.tsv`` / ``qrels.train-all.txt`` (the 809 BEIR train claims), and the same
    split by a hash of the claim id into ``queries.train.tsv`` / ``qrels.train.txt`` (~90%) and
    ``queries.dev.tsv`` / ``qrels.dev.txt`` (~``dev_fraction``).

    Returns:
        ``docs``, ``queries`` and ``qrels`` (all train claims), and ``queries.<split>`` for each split.

    Raises:
        InputError: the zip is missing, lacks a member, or holds an empty abstract.
    """
    zip_path = str(zip_path)
    if not Path(zip_path).exists():
        raise InputError("file not found", path=zip_path)
    out_dir = Path(out_dir)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            corpus = _rows(archive, "corpus_train.csv", zip_path)
            claims = _rows(archive, "claims_train.csv", zip_path)
    except zipfile.BadZipFile:
        raise InputError("not a zip file", path=zip_path) from None
    docs = []
    for line, row in enumerate(corpus, start=2):
        sentences = parse_sentences(row["abstract"])
        if not sentences:
            raise InputError(
                f"doc {row['doc_id']}: empty abstract", path=f"{zip_path}:corpus_train.csv", line=line
            )
        docs.append(json.dumps({"_id": row["doc_id"], "title": row["title"], "text": " ".join(sentences)}))
    queries: dict[str, str] = {}
    qrels: dict[tuple[str, str], None] = {}
    for row in claims:
        queries.setdefault(row["id"], row["claim"])
        for doc_id in row["cited_doc_ids"].strip("[]").replace(",", " ").split():
            qrels[(row["id"], doc_id)] = None
    atomic.write_lines(out_dir / "corpus.jsonl", docs)
    counts = {"docs": len(docs), "queries": len(queries), "qrels": len(qrels)}
    for split, keep in (
        ("train-all", lambda q: True),
        ("train", lambda q: not _is_dev(q, dev_fraction)),
        ("dev", lambda q: _is_dev(q, dev_fraction)),
    ):
        chosen = {qid: text for qid, text in queries.items() if keep(qid)}
        atomic.write_lines(
            out_dir / f"queries.{split}.tsv", (f"{qid}\t{text}" for qid, text in chosen.items())
        )
        atomic.write_lines(out_dir / f"qrels.{split}.txt", (f"{q} 0 {d} 1" for q, d in qrels if q in chosen))
        counts[f"queries.{split}"] = len(chosen)
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """The command line: ``python eval/prepare_scifact.py ZIP OUT_DIR``; prints and returns the counts."""
    parser = argparse.ArgumentParser(
        prog="python eval/prepare_scifact.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("zip", metavar="ZIP", help="scifact.hf-csv.zip (in ../shared/data/scifact)")
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder for the BEIR-style files, e.g. outputs/scifact"
    )
    args = parser.parse_args(argv)
    try:
        counts = prepare_scifact(args.zip, args.out_dir)
    except InputError as err:
        print(f"prepare_scifact: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(counts)
    return counts


if __name__ == "__main__":
    main()
