"""The negative cache's settings: section ``cache`` of a training config, with defaults and help text."""

from __future__ import annotations

from dataclasses import dataclass

from dualenc.io.config_file import choice, help_field, positive
from dualenc.model.options import TORCH_DTYPES

CACHE_MODES = ("corpus", "stream")
CANDIDATE_MODES = ("dense", "sce")


@dataclass
class CacheConfig:
    """The negative cache (Lindgren et al., NeurIPS 2021; ALGORITHMS.md A1-A4): loss=cache, cache_ce, sce."""

    cache_mode: str = help_field(
        "corpus",
        "corpus: one slot per training-corpus document, filled by an encode pass before training; "
        "stream: a FIFO of the most recent batch documents (cache_size slots)",
    )
    cache_size: int = help_field(65_536, "stream mode: slots over all processes")
    cache_dtype: str = help_field("float32", "float32 | bfloat16 | float16 table storage")
    refresh_fraction: float = help_field(
        0.01, "corpus mode: fraction of the table re-encoded (globally oldest first) per optimizer step"
    )
    num_cache_negatives: int = help_field(1, "negatives sampled from the cache per query")
    cache_sample_with_replacement: bool = help_field(
        True, "independent Gumbel-max draws (true) or Gumbel-top-m distinct draws"
    )
    cache_inbatch: bool = help_field(
        True, "keep the batch's documents as exact negatives (false = the reference loss)"
    )
    cache_lru: bool = help_field(True, "stream mode: a sampled negative's write-back renews it")
    cache_fill_batch_size: int = help_field(128, "texts per forward pass when filling")
    cache_candidates: str = help_field(
        "dense",
        "dense: score every slot; sce: only the slots of SCE buckets (section sce: sce_n_buckets, "
        "sce_bucket_size_x, sce_bucket_size_y, sce_mix), for tables too large to score densely",
    )
    cache_score_block_size: int = help_field(
        65_536, "slots scored at once when sampling (memory O(queries x block))"
    )

    def __post_init__(self) -> None:
        choice("cache_mode", self.cache_mode, CACHE_MODES)
        choice("cache_dtype", self.cache_dtype, TORCH_DTYPES)
        choice("cache_candidates", self.cache_candidates, CANDIDATE_MODES)
        if not 0 <= self.refresh_fraction <= 1:
            raise ValueError(f"refresh_fraction={self.refresh_fraction} must be in [0, 1]")
        positive("num_cache_negatives", self.num_cache_negatives)
        positive("cache_fill_batch_size", self.cache_fill_batch_size)
        positive("cache_score_block_size", self.cache_score_block_size)
