"""The parts ``dualenc.training.loop`` assembles: model construction, dev evaluation, optimizer groups, the log."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dualenc.model.encoder import DualEncoder, DualEncoderConfig, HFEncoder
from dualenc.training.config_sections import DataConfig, ModelConfig

logger = logging.getLogger(__name__)

VOCAB_TEXTS = 200_000  # texts used to train a random model's WordPiece vocabulary


def build_model(cfg: ModelConfig, data, *, seed: int, init_dir: Path, accelerator) -> DualEncoder:
    """The dual encoder to train: loaded from ``model_name_or_path``, or a random BERT (``random_init``).

    A random model (and its WordPiece vocabulary, whose trainer breaks frequency ties arbitrarily) is built once
    by the main process and saved to ``init_dir``; every process, and every resumed run, loads that copy.
    """
    overrides = {
        name: getattr(cfg, name)
        for name in (
            "pooling",
            "normalize",
            "query_max_len",
            "passage_max_len",
            "query_prefix",
            "passage_prefix",
        )
        if getattr(cfg, name) is not None
    }
    if cfg.random_init:
        if accelerator.is_main_process and not (init_dir / "dualenc_config.json").exists():
            _random_model(cfg, data, overrides, seed).save_pretrained(init_dir)
        accelerator.wait_for_everyone()
        model = DualEncoder.from_pretrained(init_dir)
    else:
        model = DualEncoder.from_pretrained(
            cfg.model_name_or_path, dtype=cfg.dtype, shared=not cfg.untie_encoder, **overrides
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger.info("model: %s, %d parameters", model.config, sum(p.numel() for p in model.parameters()))
    return model


def _random_model(cfg: ModelConfig, data, overrides: dict, seed: int) -> DualEncoder:
    from dualenc.model.random_bert import random_bert

    texts = itertools.chain(data.groups["query"], data.corpus["text"])
    bert, tokenizer = random_bert(
        itertools.islice(texts, VOCAB_TEXTS),
        vocab_size=cfg.random_vocab_size,
        hidden_size=cfg.random_hidden_size,
        num_layers=cfg.random_num_layers,
        num_heads=cfg.random_num_heads,
        intermediate_size=cfg.random_intermediate_size,
        dropout=cfg.random_dropout,
        seed=seed,
    )
    config = DualEncoderConfig(**{**overrides, "shared": not cfg.untie_encoder})
    tower = HFEncoder(bert, pooling=config.pooling, normalize=config.normalize)
    return DualEncoder(tower, copy.deepcopy(tower) if cfg.untie_encoder else None, tokenizer, config)


def save_trained_model(model: DualEncoder, path: Path) -> None:
    """``model.save_pretrained(path)``: a dualenc model dir (HF or custom towers) that ``from_pretrained`` loads."""
    model.save_pretrained(path)


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices; not biases, LayerNorm weights or the temperature."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(
            param
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class DevSet:
    """A dev collection, topics and qrels held in memory for evaluation during training."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    hits: int = 100

    @torch.no_grad()
    def evaluate(self, model: DualEncoder, measure: str, *, batch_size: int, device) -> dict[str, float]:
        """Encode, search exactly, score with ir-measures; leaves the model in eval mode."""
        from dualenc.evaluation.measures import evaluate
        from dualenc.io.runs import run_from_search
        from dualenc.retrieval.encode import encode_texts
        from dualenc.retrieval.topk import exact_search_torch

        model.eval()
        docs = encode_texts(model, self.doc_texts, kind="doc", batch_size=batch_size, device=device)  # (N, D)
        queries = encode_texts(model, self.query_texts, kind="query", batch_size=batch_size, device=device)
        scores, rows = exact_search_torch(
            queries, docs, min(self.hits, len(docs)), device=str(device), doc_ids=self.doc_ids
        )
        run = run_from_search(self.query_ids, self.doc_ids, scores, rows)
        return evaluate(self.qrels, run, measure)


def load_dev_set(cfg: DataConfig) -> DevSet:
    from dualenc.io.readers import doc_text, read_collection, read_qrels, read_queries

    corpus = read_collection(cfg.dev_corpus_file, cache_dir=cfg.datasets_cache_dir)
    topics = read_queries(cfg.dev_topics_file, cache_dir=cfg.datasets_cache_dir)
    qrels = read_qrels(cfg.dev_qrels_file)
    judged = [qid for qid in topics["id"] if qid in qrels]
    keep = set(judged)
    rows = [i for i, qid in enumerate(topics["id"]) if qid in keep]
    texts = [doc_text(t, x) for t, x in zip(corpus["title"], corpus["text"], strict=True)]
    logger.info("dev set: %d docs, %d judged queries of %d", len(corpus), len(rows), len(topics))
    return DevSet(list(corpus["id"]), texts, judged, [topics["text"][i] for i in rows], qrels)


class JsonlLog:
    """Append-only ``train_log.jsonl`` (one object per logged step), written by the main process only."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop entries past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
        from dualenc.io.atomic import write_lines

        write_lines(self.path, kept)
