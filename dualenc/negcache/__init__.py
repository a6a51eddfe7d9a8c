"""The negative cache: a sharded table of stale document embeddings, exact Gumbel-max draws from it and its
refresh. The layer above dualenc.retrieval, beside dualenc.evaluation: it imports dualenc.retrieval,
dualenc.model, dualenc.losses and dualenc.io."""

from __future__ import annotations

from dualenc.negcache.config import CacheConfig
from dualenc.negcache.draw import CacheDraw, CacheSampler, StepQueries, gather_stacked
from dualenc.negcache.gumbel import GumbelKey, NoiseFn, combine_lse, derived_seed, keyed_gumbel
from dualenc.negcache.negative_cache import NegativeCache, shared_generator
from dualenc.negcache.refresh import StalenessStats, global_oldest, staleness
from dualenc.negcache.scan import ScanResult, merge_shards, scan_table
from dualenc.negcache.sce_candidates import scan_candidates
from dualenc.negcache.slot_index import SlotIndex
from dualenc.negcache.table import EmbeddingTable

__all__ = [
    "CacheConfig",
    "CacheDraw",
    "CacheSampler",
    "EmbeddingTable",
    "GumbelKey",
    "NegativeCache",
    "NoiseFn",
    "ScanResult",
    "SlotIndex",
    "StalenessStats",
    "StepQueries",
    "combine_lse",
    "derived_seed",
    "gather_stacked",
    "global_oldest",
    "keyed_gumbel",
    "merge_shards",
    "scan_candidates",
    "scan_table",
    "shared_generator",
    "staleness",
]
