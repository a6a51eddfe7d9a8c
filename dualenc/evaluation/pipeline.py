"""End-to-end evaluation: collection + topics + qrels + model -> embeddings, index, run, measures, report.

The eval scripts (``eval/*.py``, through ``eval/eval_common.py``) run this. Corpus embeddings and the index
are kept in ``work_dir`` and reused when the model directory and the collection are unchanged (re-encoded
otherwise), so a rerun only searches and scores.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dualenc.errors import InputError
from dualenc.evaluation.measures import check_run_queries, evaluate
from dualenc.io.embeddings import META_FILE, read_meta, write_collection_meta
from dualenc.io.provenance import environment_info
from dualenc.io.qrels import read_qrels
from dualenc.io.readers import read_collection, read_queries
from dualenc.io.runs import write_run
from dualenc.model.encoder import DualEncoder
from dualenc.retrieval.encode import encode_texts, model_fingerprint
from dualenc.retrieval.encode_to_disk import encode_collection
from dualenc.retrieval.index_dir import INDEX_META_FILE, index_from_embeddings, read_index_meta
from dualenc.retrieval.search import search_vectors

logger = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """One evaluation: which model, which data, which index."""

    model: str  # dualenc / sentence-transformers / HF model directory
    collection: str  # .tsv or BEIR .jsonl
    topics: str  # .tsv(.gz) or BEIR .jsonl
    qrels: str  # TREC qrels
    work_dir: str  # embeddings, index and run are written here
    measures: str = "trec-dl"  # preset or ir-measures strings
    factory: str = "Flat"  # faiss.index_factory string; "Flat" searches the embeddings exactly (torch)
    hits: int = 1000  # documents retrieved per query
    batch_size: int = 128  # texts per forward pass when encoding
    device: str = "auto"  # "auto" = cuda when available, else cpu
    search_params: str | None = None  # e.g. "nprobe=64" or "efSearch=256"
    query_max_len: int | None = None  # override the model's (tokens)
    passage_max_len: int | None = None  # override the model's (tokens)
    run_tag: str = "dualenc"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _corpus_embeddings(model, cfg: PipelineConfig, device: torch.device, model_id: str) -> Path:
    collection = read_collection(cfg.collection)
    emb_dir = Path(cfg.work_dir) / "corpus"
    identity = {
        "model_fingerprint": model_id,
        "collection": str(Path(cfg.collection).resolve()),
        "collection_fingerprint": collection._fingerprint,
        "passage_max_len": model.config.passage_max_len,
    }
    if (emb_dir / META_FILE).exists():
        meta = read_meta(emb_dir)
        if all(meta.get(k) == v for k, v in identity.items() if k != "encode_seconds"):
            logger.info("reusing corpus embeddings in %s", emb_dir)
            return emb_dir
        logger.info("model or collection changed: re-encoding %s", emb_dir)
        shutil.rmtree(emb_dir)
    amp = torch.bfloat16 if device.type == "cuda" else None
    start = time.perf_counter()
    encode_collection(
        model, collection, emb_dir, batch_size=cfg.batch_size, device=device, autocast_dtype=amp
    )
    identity["encode_seconds"] = time.perf_counter() - start  # of the last (possibly resumed) session
    write_collection_meta(emb_dir, num_shards=1, model_name=cfg.model, kind="doc", extra=identity)
    return emb_dir


def _index(emb_dir: Path, cfg: PipelineConfig) -> Path:
    if cfg.factory == "Flat":
        return emb_dir  # exact search straight from the embeddings
    safe = cfg.factory.replace(",", "_").replace("/", "_")
    index_dir = Path(cfg.work_dir) / f"index-{safe}"
    if not _built_from(index_dir, read_meta(emb_dir)):
        index_from_embeddings(emb_dir, index_dir, cfg.factory, progress=True)
    return index_dir


def _built_from(index_dir: Path, emb_meta: dict) -> bool:
    """Whether ``index_dir`` indexes exactly these embeddings (its ``index_meta.json`` records their meta)."""
    if not (index_dir / INDEX_META_FILE).exists():
        return False
    try:
        return read_index_meta(index_dir).get("embeddings_meta") == emb_meta
    except InputError:  # unreadable or from an older dualenc: build it again
        return False


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Encode, index, retrieve and score; return a JSON-ready report (config, provenance, timings, scores)."""
    device = _device(cfg.device)
    overrides = {
        k: v for k, v in (("query_max_len", cfg.query_max_len), ("passage_max_len", cfg.passage_max_len)) if v
    }
    model = DualEncoder.from_pretrained(cfg.model, **overrides).to(device).eval()
    timings = {}
    # the weights' fingerprint, as `dualenc encode` records it: this index and its query vectors compare
    emb_dir = _corpus_embeddings(model, cfg, device, model_fingerprint(model))
    timings["encode_corpus_s"] = read_meta(emb_dir).get("encode_seconds")  # when the embeddings were made
    t0 = time.perf_counter()
    index_path = _index(emb_dir, cfg)
    timings["index_s"] = time.perf_counter() - t0
    topics, qrels = read_queries(cfg.topics), read_qrels(cfg.qrels)
    t0 = time.perf_counter()
    query_emb = encode_texts(
        model, list(topics["text"]), kind="query", batch_size=cfg.batch_size, device=device
    )
    timings["encode_queries_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = search_vectors(
        list(topics["id"]),
        query_emb,
        index_path,
        k=cfg.hits,
        device=str(device),
        search_params=cfg.search_params,
    )
    timings["search_s"] = time.perf_counter() - t0
    run_path = Path(cfg.work_dir) / "run.trec"
    write_run(run, run_path, format="trec", tag=cfg.run_tag, k=cfg.hits)
    check_run_queries(run, qrels, run_path=run_path, qrels_path=cfg.qrels)  # warns about unjudged topics
    measures = evaluate(qrels, run, cfg.measures)
    meta = read_meta(emb_dir)
    return {
        "config": asdict(cfg),
        "model_config": asdict(model.config),
        "counts": {"docs": meta["count"], "queries": len(topics), "qrels_queries": len(qrels)},
        "run_file": str(run_path),
        "timings": timings,
        "measures": measures,
        **environment_info(Path(__file__).parent),
    }
