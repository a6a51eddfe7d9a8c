"""Evaluation: score runs against qrels with ir-measures, the end-to-end pipeline (encode, index, search,
score, report) and the dev set scored during training. The layer above dualenc.retrieval, beside
dualenc.negcache: it imports dualenc.retrieval, dualenc.model, dualenc.io and dualenc.errors."""

from dualenc.evaluation.dev_set import DevSet, load_dev_set
from dualenc.evaluation.measures import (
    PRESETS,
    check_run_queries,
    evaluate,
    evaluate_per_query,
    parse_measures,
)
from dualenc.evaluation.pipeline import PipelineConfig, run_pipeline

__all__ = [
    "DevSet",
    "PRESETS",
    "PipelineConfig",
    "check_run_queries",
    "evaluate",
    "evaluate_per_query",
    "load_dev_set",
    "parse_measures",
    "run_pipeline",
]
