"""Scalable Cross-Entropy of live queries against the cached table of stale document embeddings (loss=sce).

cache-CE is the full softmax of each query over [its live positive, every cached document (constants)]: the
gradient reaches the query tower and the positives only (XBM/MoCo-style; ALGORITHMS.md A5 use 1). This module
is its memory-light stand-in: :class:`~dualenc.losses.sce.ScalableCE` over (X = scaled queries, W = the
table), with the live positive logit appended and the positive's own (stale) slot masked as the row's target.
With full coverage (one bucket holding every query and every slot) it equals cache-CE exactly, value and
gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from dualenc.losses.base import LossInputs, LossOutput, Temperature
from dualenc.losses.sce import SCE_CITATION, ScalableCE


class TableSCE(nn.Module):
    """SCE over a table of cached document embeddings, with a live positive per query.

    Args:
        temperature: τ; logits are <q, e>/τ.
        learn_temperature: learn log(1/τ).
        n_buckets, bucket_size_x, bucket_size_y, mix, block_size: :class:`~dualenc.losses.sce.ScalableCE`
            knobs (None = the paper's default :func:`~dualenc.losses.sce.default_bucket_count` of the B
            queries for n_b and b_x).

    Inputs (:class:`~dualenc.losses.base.LossInputs`):
        q_emb (B, D) live queries; d_emb[targets] (B, D) their live positives; cache.target_slots (B,) the
        table slot holding each positive's stale copy (masked as the row's own target); cache.table (M, D)
        stale embeddings (float32, no grad); cache.generator draws the bucket centres.
    """

    citation = SCE_CITATION
    cache_terms = "table"

    def __init__(
        self,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        *,
        n_buckets: int | None = None,
        bucket_size_x: int | None = None,
        bucket_size_y: int = 256,
        mix: bool = False,
        block_size: int = 65_536,
    ):
        super().__init__()
        self.temperature = Temperature(temperature, learn_temperature)
        self.sce = ScalableCE(n_buckets, bucket_size_x, bucket_size_y, mix=mix, block_size=block_size)

    def forward(self, inputs: LossInputs) -> LossOutput:
        q_emb, pos_emb, cache = inputs.q_emb, inputs.d_emb[inputs.targets], inputs.cache  # (B, D), (B, D)
        if cache is None or cache.table is None:
            raise ValueError("TableSCE needs the cached table (LossInputs.cache.table)")
        table, target_slots, generator = cache.table, cache.target_slots, cache.generator
        scale = self.temperature().to(torch.promote_types(q_emb.dtype, torch.float32))  # ()
        x = q_emb * scale  # (B, D): scaled queries, so <x, e> = <q, e>/τ
        pos_logit = (x * pos_emb).sum(-1)  # (B,) live positive
        out = self.sce(x, table.detach(), target_slots, generator=generator, pos_logit=pos_logit)
        out.logs.update(loss=out.loss.detach(), scale=scale.detach())
        return out
