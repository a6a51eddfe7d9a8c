"""Settings of Scalable Cross-Entropy over the cached table (section ``sce`` of a training config)."""

from __future__ import annotations

from dataclasses import dataclass

from dualenc.io.config_file import help_field, positive


@dataclass
class SCEConfig:
    """Scalable Cross-Entropy over the cached table (Mezentsev et al., RecSys 2024; ALGORITHMS.md A5)."""

    sce_n_buckets: int = help_field(0, "n_b bucket centres per step; 0 = int(2 sqrt(queries))")
    sce_bucket_size_x: int = help_field(0, "b_x queries per bucket; 0 = int(2 sqrt(queries))")
    sce_bucket_size_y: int = help_field(256, "b_y table rows per bucket (paper grid 64-4096)")
    sce_mix: bool = help_field(False, "Mix centres: random combinations of the queries")
    sce_block_size: int = help_field(65_536, "table rows scored at once when picking items")

    def __post_init__(self) -> None:
        for name in ("sce_n_buckets", "sce_bucket_size_x"):
            positive(name, getattr(self, name), allow_zero=True)
        positive("sce_bucket_size_y", self.sce_bucket_size_y)
        positive("sce_block_size", self.sce_block_size)
